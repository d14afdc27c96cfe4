"""`stylekit video --tiled`: every frame at its own size over MultiDiffusion windows, one at a time.

On the tiny random SD1.5 (native window 32 latents, 256 px), LCM (re-noises every step, so the
fixed stage noises are exercised). What is checked: frames of one window are the untiled
sequential run, the UNet sees window batches of the window size, and the CLI end to end.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit.engine.img2img import Windows
from stylekit.engine.stream import FrameStream, StreamOptions
from stylekit.media.video import ffmpeg_exe, read_frames
from stylekit.tasks.stylize import Tiled

SETTINGS = dict(
    accelerator="none", scheduler="lcm", steps=2, strength=0.5, cfg=1.0, style_mode="none"
)


def _ffmpeg(*args: str) -> None:
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    subprocess.run(cmd, check=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """5 frames of a moving test pattern at a size off the 8 grid, 130 × 98 (padded to 136 × 104)."""
    path = tmp_path_factory.mktemp("clips") / "pan.mp4"
    _ffmpeg(
        *("-f", "lavfi", "-i", "testsrc2=size=130x98:rate=10"),
        *("-vf", "format=rgb24", "-frames:v", "5"),
        *("-c:v", "libx264", "-pix_fmt", "yuv444p", str(path)),
    )
    return path


@pytest.fixture(scope="module")
def session(sd15_path):
    from stylekit.api import Runtime
    from stylekit.session import open_session, resolve_settings

    settings = resolve_settings(None, None, dict(model=str(sd15_path), **SETTINGS))
    return open_session(settings, runtime=Runtime(device="cpu", dtype="fp32"))


def run_stream(session, frames, windows=None, **options):
    s = session.settings
    opts = StreamOptions(steps=s.steps, strength=s.strength, seed=3, stream_batch=False, **options)
    fs = FrameStream(session.model, session.cond, session.sampler, opts, windows=windows)
    outs = [out.copy() for out in fs.run(frames)]
    run_stream.stats = fs.stats
    return outs


def windows_of(size: tuple[int, int], native: int, **kw) -> Windows:
    plan = Tiled(1.0, **kw).plan(size, native)
    return Windows(plan.windows(), view_batch=plan.view_batch)


def test_one_window_frames_are_the_untiled_run(session, clip):
    """136 × 104 px padded frames are one 32-latent window and one VAE tile: the same draws (the
    fixed posterior and stage noises), UNet calls and whole-latent VAE as the sequential untiled
    stream, so every frame is identical."""
    frames = list(read_frames(clip))
    one = windows_of((136, 104), session.native)
    assert len(one.views) == 1
    plain = run_stream(session, frames)
    tiled = run_stream(session, frames, windows=one)
    assert len(tiled) == len(plain) == 5 and tiled[0].shape == (98, 130, 3)
    assert all(np.array_equal(a, b) for a, b in zip(tiled, plain, strict=True))


def test_unet_sees_window_batches_of_the_window_size(session, clip):
    """8-latent windows every 4, 3 per call, on 13 × 17 latents: every UNet call has at most 3
    windows of 8 × 8 latents, the frames keep their size and count, and the stats count every
    UNet call (2 frames × 2 stages × ⌈windows / 3⌉)."""
    frames = list(read_frames(clip))[:2]
    spec = windows_of((136, 104), session.native, window=8, stride=4, view_batch=3)
    assert len(spec.views) > 3
    shapes, calls = set(), []

    def see(module, args) -> None:  # a pre-hook returning None leaves the inputs alone
        shapes.add(tuple(args[0].shape))
        calls.append(1)

    hook = session.model.unet.register_forward_pre_hook(see)
    try:
        out = run_stream(session, frames, windows=spec)
    finally:
        hook.remove()
    assert len(out) == 2 and out[0].shape == (98, 130, 3)
    assert {s[1:] for s in shapes} == {(4, 8, 8)} and max(s[0] for s in shapes) == 3
    assert run_stream.stats.unet_calls == len(calls) == 2 * 2 * -(-len(spec.views) // 3)


def video_cli(clip, model, *extra):
    from stylekit import cli

    args = [str(clip), "--model", str(model), "--accelerator", "none", "--scheduler", "lcm"]
    args += ["--steps", "2", "--strength", "0.5", "--cfg", "1", "--device", "cpu"]
    args += ["--dtype", "fp32", "--seed", "1", "--json", "-q"]
    return CliRunner().invoke(cli.app, ["video", *args, *map(str, extra)])


def test_cli_tiled_video_keeps_frame_size_and_count(clip, sd15_path, tmp_path):
    """130 × 98 frames, far above nothing but run over 8-latent windows: the PNG frames keep the
    input's size and count, and the record says tiled, the windows and no stream batch."""
    out = tmp_path / "frames"
    result = video_cli(clip, sd15_path, "--tiled", "--window", "8", "--frames-out", out)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in records] == ["done"]
    frames = [np.asarray(Image.open(p)) for p in sorted((out / "pan").glob("*.png"))]
    assert len(frames) == 5 and all(f.shape == (98, 130, 3) for f in frames)
    meta = records[0]["settings"]
    assert meta["tiled"] is True and meta["window"] == 8 and meta["stride"] == 4
    assert meta["windows"] > 1 and meta["stream_batch"] is False
    assert meta["working_size"] == "130x98"


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--tiled", "--stream-batch"), "drop --stream-batch"),
        (("--tiled", "--consistency", "anchor"), "--consistency anchor has no --tiled"),
        (("--window", "16"), "--window and --stride need --tiled"),
        (("--tiled", "--max-size", "64"), "drop --size"),
    ],
)
def test_cli_tiled_video_refuses_conflicting_flags(clip, sd15_path, tmp_path, flags, message):
    result = video_cli(clip, sd15_path, *flags, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output, result.output
