"""Nothing silent (issue 16 §1): every output carries the settings it was made with, and only
those; conflicts are refused; what the run changes on its own is said once.

Tiny random models on the CPU; videos are a few frames of 40x32.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.media.metadata import read_metadata, read_parameters
from stylekit.media.video import ffmetadata_tags, ffmpeg_exe, probe

RUNNER = CliRunner()


def tiny(model: Path, *, steps: int = 2) -> list[str]:
    """Flags that run a tiny local model on the CPU without any hub download."""
    return [
        *("--model", str(model), "--accelerator", "none"),
        *("--dtype", "fp32", "--device", "cpu", "--steps", str(steps)),
    ]


def cli(*args, model: Path, seed: int | None = 1):
    """`stylekit ARGS` on the tiny model, in-process, quiet; click's Result."""
    extra = [*tiny(model), *(["--seed", str(seed)] if seed is not None else []), "-q"]
    return RUNNER.invoke(app, [*map(str, args), *extra])


def write_image(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """4 frames of 40x32 at 10 fps with a short audio track."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    cmd += ["-f", "lavfi", "-i", "testsrc2=size=40x32:rate=10"]
    cmd += ["-f", "lavfi", "-t", "0.4", "-i", "sine=frequency=440:sample_rate=44100"]
    cmd += ["-frames:v", "4", "-c:v", "libx264", "-pix_fmt", "yuv444p", "-c:a", "aac", str(path)]
    subprocess.run(cmd, check=True)
    return path


VIDEO_FLAGS = ("--scheduler", "lcm", "--strength", "0.5", "--cfg", "1", "--style-mode", "none")


# --- videos and frames carry their settings ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["mp4", "webm", "mkv"])
def test_video_output_carries_its_settings(clip, tmp_path, sd15_path, fmt):
    out = tmp_path / "out"
    result = cli(
        "video",
        clip,
        "-o",
        out,
        "-f",
        fmt,
        *VIDEO_FLAGS,
        "--prompt",
        "a=b; #c",
        model=sd15_path,
        seed=5,
    )
    assert result.exit_code == 0, result.stderr
    video = out / f"clip.{fmt}"
    assert probe(video).frame_count == 4
    meta = read_metadata(video)
    assert meta["seed"] == 5 and meta["steps"] == 2 and meta["strength"] == 0.5
    assert meta["model"] == str(sd15_path) and meta["input"] == "clip.mp4"
    assert meta["prompt"] == "a=b; #c"  # ffmetadata's separators survive the round trip
    assert meta["frames"] == 4 and meta["fps"] == "10" and meta["consistency"] == "noise"
    assert meta["size"] == "40x32" and meta["input_size"] == "40x32"


def test_frames_out_pngs_carry_the_image_chunks(clip, tmp_path, sd15_path):
    frames = tmp_path / "frames"
    result = cli("video", clip, "--frames-out", frames, *VIDEO_FLAGS, model=sd15_path, seed=3)
    assert result.exit_code == 0, result.stderr
    pngs = sorted((frames / "clip").glob("*.png"))
    assert len(pngs) == 4
    for index, path in enumerate(pngs):
        meta = read_metadata(path)
        assert meta["frame"] == index and meta["seed"] == 3 and meta["frames"] == 4
        params = read_parameters(path)
        assert params.startswith("Steps: 2, Sampler: LCM, CFG scale: 1.0, Seed: 3, Size: 40x32")
        assert f"Frame: {index}" in params


def test_ffmetadata_escapes():
    text = ';FFMETADATA1\nmajor_brand=isom\nCOMMENT={"a":"b\\=c\\;d\\#e\\\\f","n":"x\\\ny"}\n'
    text += "[STREAM]\ncomment=not global\n"
    tags = ffmetadata_tags(text)
    assert tags == {"major_brand": "isom", "comment": '{"a":"b=c;d#e\\f","n":"x\ny"}'}
