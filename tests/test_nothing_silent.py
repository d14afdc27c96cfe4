"""Nothing silent (issue 16 §1): every output carries the settings it was made with, and only
those; conflicts are refused; what the run changes on its own is said once.

Tiny random models on the CPU; videos are a few frames of 40x32.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.media.ffmpeg import ffmetadata_tags, ffmpeg_exe
from stylekit.media.metadata import read_metadata, read_parameters
from stylekit.media.video import probe

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


# --- conflicts are refused ---------------------------------------------------------------------


def no_load(monkeypatch):
    """Make any model load fail the test: these refusals come before it."""
    from stylekit.engine import models

    def load(spec):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(models, "load", load)


@pytest.mark.parametrize(
    "args",
    [
        ["stylize", "{img}", "--style", "{ref}", "--style-mode", "none"],
        ["stylize", "{img}", "--style", "{ref}", "--preset", "sd-turbo"],
        ["t2i-styled", "a cat", "--style", "{ref}", "--style-mode", "none"],
        ["inpaint", "{img}", "--mask", "{ref}", "--style", "{ref}", "--style-mode", "none"],
    ],
)
def test_style_with_style_mode_none_is_refused(tmp_path, sd15_path, monkeypatch, args):
    img, ref = write_image(tmp_path / "a.png"), write_image(tmp_path / "ref.png", seed=1)
    no_load(monkeypatch)
    result = cli(
        *[a.format(img=img, ref=ref) for a in args], "-o", tmp_path / "out", model=sd15_path
    )
    assert result.exit_code == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "style mode is none" in line and "--style-mode ad" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "out", "fmt"),
    [
        (["stylize", "{img}"], "out.jpg", "png"),
        (["stylize", "{img}"], "out.png", "webp"),
        (["t2i-styled", "a cat", "--style-mode", "none"], "cat.png", "jpg"),
        (["video", "{clip}", *VIDEO_FLAGS], "styled.mp4", "webm"),
    ],
)
def test_output_file_with_another_format_is_refused(
    tmp_path, clip, sd15_path, monkeypatch, args, out, fmt
):
    img = write_image(tmp_path / "a.png")
    no_load(monkeypatch)
    args = [a.format(img=img, clip=clip) for a in args]
    result = cli(*args, "-o", tmp_path / out, "-f", fmt, model=sd15_path)
    assert result.exit_code == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert f"--format is {fmt}" in line and str(tmp_path / out) in line


def test_output_file_with_its_own_format_is_fine(tmp_path, sd15_path):
    img = write_image(tmp_path / "a.png")
    result = cli("stylize", img, "-o", tmp_path / "out.jpg", "-f", "jpeg", model=sd15_path)
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "out.jpg").format == "JPEG"


# --- sizes rounded: said once, recorded --------------------------------------------------------

ROUNDED = "rounded down to multiples of 8"


def test_rounded_sizes_are_said_once_and_recorded(tmp_path, sd15_path):
    for name, size in [("a", (75, 53)), ("b", (77, 61)), ("c", (75, 53))]:
        write_image(tmp_path / "in" / f"{name}.png", size)
    out = tmp_path / "out"
    args = ["stylize", tmp_path / "in", "-o", out, "--batch-size", "1", *tiny(sd15_path)]
    result = RUNNER.invoke(app, [*map(str, args), "--seed", "1"])
    assert result.exit_code == 0, result.stderr
    notices = [line for line in result.stderr.splitlines() if ROUNDED in line]
    assert len(notices) == 1 and "75x53 → 72x48" in notices[0]
    for name, size, rounded in [("a", "75x53", (72, 48)), ("b", "77x61", (72, 56))]:
        assert Image.open(out / f"{name}.png").size == rounded
        meta = read_metadata(out / f"{name}.png")
        assert meta["input_size"] == size and meta["size"] == "{}x{}".format(*rounded)


def test_no_rounding_notice_when_nothing_is_rounded(tmp_path, sd15_path):
    img = write_image(tmp_path / "a.png", (75, 53))
    for flags in (["--keep-size"], ["--size", "64x64"]):
        args = ["stylize", img, "-o", tmp_path / "out", "--overwrite", *flags, *tiny(sd15_path)]
        result = RUNNER.invoke(app, [*map(str, args), "--seed", "1"])
        assert result.exit_code == 0, result.stderr
        assert ROUNDED not in result.stderr


def test_texture_at_a_rounded_exemplar_size_says_so_once(tmp_path, sd15_path):
    for name in ("a", "b"):
        write_image(tmp_path / "in" / f"{name}.png", (75, 53), seed=2)
    out = tmp_path / "out"
    args = ["texture", tmp_path / "in", "-o", out, "--ad-iters", "0", *tiny(sd15_path)]
    result = RUNNER.invoke(app, [*map(str, args), "--seed", "1"])
    assert result.exit_code == 0, result.stderr
    assert len([line for line in result.stderr.splitlines() if ROUNDED in line]) == 1
    meta = read_metadata(out / "a.png")
    assert meta["size"] == "72x48" and meta["input_size"] == "75x53"


# --- outputs record what the run used, and only that -------------------------------------------


def test_generated_images_record_no_denoising_strength(tmp_path, sd15_path):
    ref = write_image(tmp_path / "ref.png", seed=1)
    t2i = cli(
        "t2i-styled",
        "a cat",
        "--style",
        ref,
        "--ad-iters",
        "1",
        "--size",
        "64x64",
        "-o",
        tmp_path / "t2i.png",
        model=sd15_path,
    )
    texture = cli(
        "texture-expand",
        ref,
        "--size",
        "64x64",
        "-o",
        tmp_path / "tex.png",
        "--ad-iters",
        "0",
        model=sd15_path,
    )
    for result, name in [(t2i, "t2i.png"), (texture, "tex.png")]:
        assert result.exit_code == 0, result.stderr
        assert read_metadata(tmp_path / name)["strength"] is None
        assert "Denoising strength" not in read_parameters(tmp_path / name)


def test_optimize_mode_records_no_cfg_or_prompt(tmp_path, sd15_path):
    img, ref = write_image(tmp_path / "a.png"), write_image(tmp_path / "ref.png", seed=1)
    out = tmp_path / "out.png"
    args = ["stylize", img, "--mode", "optimize", "--opt-steps", "2", "--style", ref]
    result = cli(*args, "--prompt", "unused", "--cfg", "7", "-o", out, model=sd15_path)
    assert result.exit_code == 0, result.stderr
    meta, params = read_metadata(out), read_parameters(out)
    assert meta["cfg_scale"] is None and meta["prompt"] is None and meta["negative_prompt"] is None
    assert meta["sampler"] == "AD-optimize" and meta["steps"] == 2
    assert "CFG scale" not in params and "unused" not in params


def test_negative_prompt_recorded_only_where_cfg_runs(tmp_path, sd15_path):
    img = write_image(tmp_path / "a.png")
    for cfg, name in [("1", "plain.png"), ("4", "cfg.png")]:
        args = ["stylize", img, "--negative", "blurry", "--cfg", cfg, "-o", tmp_path / name]
        assert cli(*args, model=sd15_path).exit_code == 0
    assert read_metadata(tmp_path / "plain.png")["negative_prompt"] is None
    assert read_metadata(tmp_path / "cfg.png")["negative_prompt"] == "blurry"


def test_style_references_recorded_by_path_and_content_hash(tmp_path, sd15_path):
    img, ref = write_image(tmp_path / "a.png"), write_image(tmp_path / "refs" / "r.png", seed=1)
    out = tmp_path / "out.png"
    args = ["stylize", img, "--style", ref, "--style-mode", "ad", "--ad-iters", "1", "-o", out]
    assert cli(*args, model=sd15_path).exit_code == 0
    meta = read_metadata(out)
    assert meta["style"] == [str(ref)]
    assert meta["style_sha256"] == [hashlib.sha256(ref.read_bytes()).hexdigest()[:12]]


# --- an output's settings are enough to make it again ------------------------------------------

FLAGS = {  # recorded key -> the flag that sets it
    "prompt": "--prompt",
    "negative_prompt": "--negative",
    "cfg_scale": "--cfg",
    "seed": "--seed",
    "model": "--model",
    "strength": "--strength",
    "gamma": "--gamma",
    "accelerator": "--accelerator",
    "style_mode": "--style-mode",
    "style_scale": "--style-scale",
    "ad_iters": "--ad-iters",
    "ad_lr": "--ad-lr",
    "content_weight": "--content-weight",
    "tiny_vae_model": "--tiny-vae-model",
    "vae": "--vae",
    "consistency": "--consistency",
    "max_frames": "--max-frames",
}
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def flags_from(meta: dict) -> list[str]:
    """The command-line flags that give a run these recorded settings (the input aside)."""
    flags = [
        f
        for key, flag in FLAGS.items()
        if meta.get(key) is not None
        for f in (flag, str(meta[key]))
    ]
    if meta["sampler"] == "AD-optimize":
        flags += ["--mode", "optimize", "--opt-steps", str(meta["steps"])]
    else:
        flags += ["--scheduler", meta["sampler"].lower(), "--steps", str(meta["steps"])]
    flags += ["--size", meta.get("working_size") or meta["size"], "--dtype", DTYPES[meta["dtype"]]]
    flags += [f for ref in meta.get("style") or () for f in ("--style", ref)]
    flags += [f for lora in meta.get("loras") or () for f in ("--lora", lora)]
    if meta.get("ad_adain") is not None:
        flags.append("--adain" if meta["ad_adain"] else "--no-adain")
    if meta.get("stream_batch") is not None:
        flags.append("--stream-batch" if meta["stream_batch"] else "--no-stream-batch")
    return flags


def rerun(*args) -> None:
    result = RUNNER.invoke(app, [*map(str, args), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.stderr


def test_stylized_image_is_made_again_from_its_settings(tmp_path, sd15_path, tiny_vae_path):
    img, ref = write_image(tmp_path / "a.png", (75, 53)), write_image(tmp_path / "r.png", seed=1)
    first = tmp_path / "first" / "a.png"
    args = ["--style", ref, "--style-mode", "ad", "--ad-iters", "1", "--tiny-vae"]
    args += ["--tiny-vae-model", tiny_vae_path, "--prompt", "ink, wash", "--negative", "dull"]
    args += ["--cfg", "3", "--gamma", "0.3", "--strength", "0.6", "--scheduler", "tcd"]
    assert cli("stylize", img, "-o", first, *args, model=sd15_path, seed=None).exit_code == 0
    meta = read_metadata(first)
    again = tmp_path / "again" / "a.png"
    rerun("stylize", img, "-o", again, *flags_from(meta))
    assert again.read_bytes() == first.read_bytes()


def test_generated_image_is_made_again_from_its_settings(tmp_path, sd15_path):
    ref = write_image(tmp_path / "r.png", seed=1)
    first = tmp_path / "first.png"
    args = ["--style", ref, "--ad-iters", "1", "--size", "64x48", "--no-adain", "--cfg", "2"]
    assert cli("t2i-styled", "a cat", "-o", first, *args, model=sd15_path, seed=None).exit_code == 0
    meta = read_metadata(first)
    again = tmp_path / "again.png"
    flags = flags_from(meta)
    prompt = flags.index("--prompt")
    rerun("t2i-styled", flags.pop(prompt + 1), *flags[:prompt], *flags[prompt + 1 :], "-o", again)
    assert again.read_bytes() == first.read_bytes()


def test_video_frames_are_made_again_from_their_settings(clip, tmp_path, sd15_path):
    first = tmp_path / "first"
    args = ["--frames-out", first, *VIDEO_FLAGS, "--max-frames", "3", "--consistency", "none"]
    assert cli("video", clip, *args, model=sd15_path, seed=None).exit_code == 0
    frames = sorted((first / "clip").glob("*.png"))
    meta = read_metadata(frames[0])
    assert meta["max_frames"] == 3 and meta["consistency"] == "none"
    again = tmp_path / "again"
    rerun("video", clip, "--frames-out", again, *flags_from(meta))
    redone = sorted((again / "clip").glob("*.png"))
    assert [p.read_bytes() for p in redone] == [p.read_bytes() for p in frames]
