"""`stylekit video` on a tiny random SD1.5: fixed noise, similarity skips, stream batch, anchors, batch."""

import json
import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stylekit.media.video import ffmpeg_exe, probe, read_frames
from stylekit.runner import Events, Output

NTSC = Fraction(30000, 1001)
SETTINGS = dict(  # tiny, fast, and LCM re-noises every step: the fixed noise is exercised
    accelerator="none", scheduler="lcm", steps=2, strength=0.5, cfg=1.0, style_mode="none"
)


def _ffmpeg(*args: str) -> None:
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    subprocess.run(cmd, check=True)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    static, moving, broken = root / "static.mp4", root / "moving.mp4", root / "broken.mp4"
    _ffmpeg(  # 12 identical frames, lossless, so the decoded frames are identical too
        *(
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=66x50:rate=10,trim=end_frame=1,tpad=stop=11:stop_mode=clone",
        ),
        *("-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p", str(static)),
    )
    _ffmpeg(  # odd size, NTSC rate, with audio
        *("-f", "lavfi", "-i", "testsrc2=size=66x50:rate=30000/1001"),
        *("-f", "lavfi", "-t", "0.4", "-i", "sine=frequency=440:sample_rate=44100"),
        *("-vf", "format=rgb24,crop=65:49:0:0", "-frames:v", "10"),
        *("-c:v", "libx264", "-pix_fmt", "yuv444p", "-c:a", "aac", str(moving)),
    )
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return {"static": static, "moving": moving, "broken": broken, "root": root}


@pytest.fixture(scope="module")
def settings(sd15_path):
    from stylekit.session import resolve_settings

    return resolve_settings(None, None, dict(model=str(sd15_path), **SETTINGS))


@pytest.fixture(scope="module")
def runtime():
    from stylekit.api import Runtime

    return Runtime(device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def stylizer(settings, runtime):
    from stylekit.session import open_session

    return open_session(settings, runtime=runtime)


class Recorder(Events):
    def __init__(self):
        self.steps, self.records, self.warnings = [], [], []

    def step(self, done, total):
        self.steps.append((done, total))

    def finished(self, record):
        self.records.append(record)

    def warning(self, message):
        self.warnings.append(message)


def stream(stylizer, **options):
    from stylekit.engine.stream import FrameStream, StreamOptions

    s = stylizer.settings
    opts = StreamOptions(steps=s.steps, strength=s.strength, seed=3, **options)
    return FrameStream(stylizer.model, stylizer.cond, stylizer.sampler, opts)


def run_stream(stylizer, frames, **options):
    fs = stream(stylizer, **options)
    return [out.copy() for out in fs.run(frames)], fs.stats


@pytest.fixture(scope="module")
def moving_frames(videos):
    return list(read_frames(videos["moving"]))


def count_unet_calls(unet):
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls, handle


def pngs(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


# --- the batch task ----------------------------------------------------------------------------


def test_static_video_with_fixed_noise_gives_identical_frames(videos, settings, runtime, tmp_path):
    from stylekit.tasks.video import stylize_video

    for mode in ("noise", "none"):
        report = stylize_video(
            [str(videos["static"])],
            settings=settings,
            runtime=runtime,
            output=Output(seed=7),
            frames_out=tmp_path / mode,
            consistency=mode,
        )
        assert report.exit_code() == 0 and len(report.done) == 1
    fixed, fresh = pngs(tmp_path / "noise" / "static"), pngs(tmp_path / "none" / "static")
    assert len(fixed) == len(fresh) == 12
    assert fixed[0].shape == (50, 66, 3)  # padded to 72x56 for the VAE, cropped back
    assert all(np.array_equal(frame, fixed[0]) for frame in fixed)
    assert not all(np.array_equal(frame, fresh[0]) for frame in fresh[1:])
    assert not list((tmp_path / "noise").glob(".*"))  # no part folders left


def test_output_keeps_frame_count_size_exact_rate_and_audio(videos, settings, runtime, tmp_path):
    from stylekit.tasks.video import stylize_video

    events = Recorder()
    report = stylize_video(
        [str(videos["moving"])],
        settings=settings,
        runtime=runtime,
        output=Output(out=tmp_path, seed=1),
        events=events,
    )
    assert report.exit_code() == 0
    src, out = probe(videos["moving"]), probe(tmp_path / "moving.mp4")
    assert (out.size, out.frame_count, out.fps) == ((65, 49), 10, NTSC)
    assert out.audio_codec == "aac" and out.pts == src.pts
    assert events.steps == [(i, 10) for i in range(1, 11)]  # progress in frames
    record = events.records[-1]
    assert record.status == "done" and record.settings["frames"] == 10
    assert record.settings["fps"] == "30000/1001" and record.settings["consistency"] == "noise"
    json.dumps(record.settings)  # --json can print it

    again = Recorder()  # a rerun skips the finished output
    stylize_video(
        [str(videos["moving"])], settings=settings, output=Output(out=tmp_path), events=again
    )
    assert [r.status for r in again.records] == ["skipped"]


def test_trim_and_every_keep_the_selection(videos, settings, runtime, tmp_path):
    from stylekit.tasks.video import stylize_video

    stylize_video(
        [str(videos["moving"])],
        settings=settings,
        runtime=runtime,
        output=Output(out=tmp_path / "clip.mkv", seed=1),
        max_frames=3,
        every=2,
    )
    out = probe(tmp_path / "clip.mkv")
    assert (out.frame_count, out.fps, out.size) == (3, NTSC / 2, (65, 49))
    assert out.audio_codec is not None


# --- the engine --------------------------------------------------------------------------------


def test_first_frame_matches_the_still_image_path(stylizer):
    frame = np.asarray(Image.effect_mandelbrot((64, 48), (-2, -1.2, 1, 1.2), 60).convert("RGB"))
    outs, _ = run_stream(stylizer, [frame, frame[::-1].copy()])
    still = np.asarray(stylizer.img2img([Image.fromarray(frame)], [3])[0])
    assert np.array_equal(outs[0], still)


def test_similarity_filter_skips_static_frames_and_max_skip_forces_one(stylizer, videos):
    frames = list(read_frames(videos["static"]))  # 12 identical frames
    calls, handle = count_unet_calls(stylizer.model.unet)
    try:
        outs, stats = run_stream(stylizer, frames, skip_similar=0.9, max_skip=3, stream_batch=False)
        assert len(calls) == 3 * 2  # frames 0, 4 and 8 run (2 steps each); 3 skips between
        assert (stats.processed, stats.skipped) == (3, 9)
        assert len(outs) == 12 and all(np.array_equal(o, outs[0]) for o in outs)
        calls.clear()
        run_stream(stylizer, frames, stream_batch=False)  # filter off: every frame runs
        assert len(calls) == 12 * 2
    finally:
        handle.remove()


def test_similarity_filter_probability():
    from stylekit.engine.stream import SimilarityFilter

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    never = SimilarityFilter(0.98, 10, seed=0)
    assert not never.skip(a) and not never.skip(255 - a)  # c < threshold: probability 0
    filt = SimilarityFilter(0.5, 1000, seed=0)
    filt.skip(a)
    skips = [filt.skip(a) for _ in range(50)]
    assert all(skips)  # c = 1: probability 1


def test_stream_batch_equals_sequential(stylizer, moving_frames):
    calls, handle = count_unet_calls(stylizer.model.unet)
    try:
        seq, _ = run_stream(stylizer, moving_frames, stream_batch=False)
        calls.clear()
        batched, stats = run_stream(stylizer, moving_frames, stream_batch=True)
    finally:
        handle.remove()
    assert len(calls) == stats.unet_calls == 10 + 1  # one call per frame, plus one to drain
    assert max(calls) == 2  # both stages in one UNet batch
    diff = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(seq, batched, strict=True))
    assert diff <= 1  # batched matmuls may round differently; the math is the same
    anchor_seq, _ = run_stream(stylizer, moving_frames, consistency="anchor", anchor_every=4)
    anchor_batch, _ = run_stream(
        stylizer, moving_frames, consistency="anchor", anchor_every=4, stream_batch=True
    )
    pairs = zip(anchor_seq, anchor_batch, strict=True)
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in pairs) <= 1


def test_anchor_mode_runs_and_differs_from_noise_mode(stylizer, moving_frames):
    processors = dict(stylizer.model.unet.attn_processors)
    noise, _ = run_stream(stylizer, moving_frames)
    anchor, stats = run_stream(stylizer, moving_frames, consistency="anchor", anchor_every=5)
    assert stats.anchors == 2  # frames 0 and 5
    assert np.abs(noise[0].astype(int) - anchor[0]).max() <= 1  # the anchor reads nothing
    assert any(not np.array_equal(a, b) for a, b in zip(noise[1:], anchor[1:], strict=True))
    assert {k: type(v) for k, v in stylizer.model.unet.attn_processors.items()} == {
        k: type(v) for k, v in processors.items()
    }  # processors restored


@pytest.mark.parametrize("batched", [False, True])
def test_stream_pulls_frames_lazily(stylizer, moving_frames, batched):
    pulled = []

    def source():
        for i, frame in enumerate(moving_frames):
            pulled.append(i)
            yield frame

    outputs = stream(stylizer, stream_batch=batched).run(source())
    next(outputs)
    assert len(pulled) == (2 if batched else 1)  # output delay: stages - 1 frames
    assert torch.is_grad_enabled()  # no_grad does not leak out of the suspended generator
    outputs.close()


def test_bad_options_are_usage_errors():
    from stylekit.engine.stream import StreamOptions
    from stylekit.errors import UsageError

    for bad in (
        dict(consistency="flow"),
        dict(skip_similar=1.0),
        dict(max_skip=-1),
        dict(anchor_every=-2),
    ):
        with pytest.raises(UsageError):
            StreamOptions(**bad).check()


# --- errors, interrupts, the command line ------------------------------------------------------


def test_broken_input_is_reported_and_the_batch_goes_on(videos, sd15_path, tmp_path):
    from stylekit import cli

    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    args = ["video", str(videos["broken"]), str(notes), str(videos["static"]), "-o", str(tmp_path)]
    args += ["--model", str(sd15_path), "--accelerator", "none", "--scheduler", "lcm"]
    args += ["--steps", "2", "--strength", "0.5", "--cfg", "1", "--style-mode", "none"]
    args += [
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--seed",
        "1",
        "--json",
        "-q",
        "--max-frames",
        "2",
    ]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in records] == ["failed", "failed", "done"]
    assert "not a readable video" in records[0]["error"]
    assert probe(tmp_path / "static.mp4").frame_count == 2
    assert not (tmp_path / "broken.mp4").exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("frames_out", [False, True])
def test_ctrl_c_mid_video_leaves_no_output(
    videos, settings, runtime, tmp_path, monkeypatch, frames_out
):
    from stylekit.engine import stream as stream_module
    from stylekit.tasks.video import stylize_video

    decode, count = stream_module.decode, []

    def interrupted(model, z):
        count.append(1)
        if len(count) == 3:
            raise KeyboardInterrupt
        return decode(model, z)

    monkeypatch.setattr(stream_module, "decode", interrupted)
    target = dict(frames_out=tmp_path / "frames") if frames_out else {}
    with pytest.raises(KeyboardInterrupt):
        stylize_video(
            [str(videos["moving"])],
            settings=settings,
            runtime=runtime,
            output=Output(out=None if frames_out else tmp_path / "out"),
            **target,
        )
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_vfr_warning_is_surfaced(settings, runtime, tmp_path):
    from stylekit.tasks.video import stylize_video

    vfr = tmp_path / "vfr.mp4"
    _ffmpeg(  # 4 frames at 30 fps, then 4 at 15 fps
        *("-f", "lavfi", "-i", "testsrc2=size=32x32:rate=30"),
        *("-vf", "setpts='if(lt(N,4),N,4+(N-4)*2)/30/TB'", "-fps_mode", "vfr"),
        *("-frames:v", "8", "-c:v", "libx264", str(vfr)),
    )
    events = Recorder()
    stylize_video(
        [str(vfr)],
        settings=settings,
        runtime=runtime,
        output=Output(out=tmp_path / "o"),
        events=events,
    )
    assert events.warnings and "variable frame rate" in events.warnings[0]
    assert events.records[-1].settings["warnings"] == events.warnings
    assert probe(tmp_path / "o" / "vfr.mp4").frame_count == 8


def test_planning_rules(videos, tmp_path):
    from stylekit.errors import UsageError
    from stylekit.tasks.video import plan_videos

    jobs = plan_videos([str(videos["root"])], Output(out=tmp_path, fmt="webm", suffix="_s"))
    assert sorted(j.output.name for j in jobs) == [
        "broken_s.webm",
        "moving_s.webm",
        "static_s.webm",
    ]
    frames = plan_videos([str(videos["static"])], Output(), tmp_path / "f")
    assert frames[0].output == tmp_path / "f" / "static"
    with pytest.raises(UsageError):
        plan_videos([str(videos["root"])], Output(out=tmp_path / "one.mp4"))
    with pytest.raises(UsageError):
        plan_videos([str(videos["static"])], Output(fmt="gif"))
    with pytest.raises(UsageError):
        plan_videos([str(videos["static"])], Output(out=tmp_path), tmp_path / "f")
