"""Streaming video I/O against real ffmpeg: exact timing, audio, odd sizes, atomic output."""

import subprocess
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from stylekit.errors import InputError, UsageError
from stylekit.media.video import (
    VideoInfo,
    VideoWriter,
    ffmpeg_exe,
    probe,
    read_frames,
    select_frames,
    write_frame_png,
)

NTSC = Fraction(30000, 1001)
AAC_FRAME = 1024 / 44100  # seconds in one AAC frame at 44.1 kHz


def _ffmpeg(*args: str) -> None:
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    subprocess.run(cmd, check=True)


def _audio_seconds(path) -> float:
    """Decoded audio length, so priming and edit lists count as a player sees them."""
    cmd = [ffmpeg_exe(), "-nostdin", "-i", str(path), "-map", "0:a:0"]
    cmd += ["-ac", "1", "-ar", "44100", "-f", "s16le", "-"]
    pcm = subprocess.run(cmd, capture_output=True, check=True).stdout
    return len(pcm) / 2 / 44100


def _copy(src, dst, **options) -> VideoInfo:
    info = probe(src)
    selection = select_frames(info, **options)
    with VideoWriter(dst, fps=selection.fps, audio=selection.audio) as writer:
        for frame in read_frames(src, info=info, **options):
            writer.write(frame)
    return probe(dst)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    av, odd, vfr = root / "av.mp4", root / "odd.mp4", root / "vfr.mp4"
    _ffmpeg(
        *("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=30000/1001"),
        *("-f", "lavfi", "-t", "1.001", "-i", "sine=frequency=440:sample_rate=44100"),
        *("-frames:v", "30", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(av)),
    )
    _ffmpeg(  # testsrc2 only makes even sizes: crop to odd, no audio
        *("-f", "lavfi", "-i", "testsrc2=size=98x66:rate=25", "-vf", "format=rgb24,crop=97:65:0:0"),
        *("-frames:v", "10", "-c:v", "libx264", "-pix_fmt", "yuv444p", str(odd)),
    )
    _ffmpeg(  # 10 frames at 30 fps, then 10 at 15 fps
        *("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=30"),
        *("-vf", "setpts='if(lt(N,10),N,10+(N-10)*2)/30/TB'", "-fps_mode", "vfr"),
        *("-frames:v", "20", "-c:v", "libx264", str(vfr)),
    )
    return {"av": av, "odd": odd, "vfr": vfr, "root": root}


def test_probe_reads_exact_rate_count_size_and_audio(videos):
    info = probe(videos["av"])
    assert (info.size, info.frame_count, info.fps) == ((96, 64), 30, NTSC)
    assert (info.audio_codec, info.vfr, info.rotation, info.warnings) == ("aac", False, 0, ())
    assert info.duration == pytest.approx(1.001)
    assert info.frame_time(29) == 29 / NTSC


def test_untrimmed_copy_keeps_frames_timestamps_and_whole_audio(videos, tmp_path):
    src = probe(videos["av"])
    assert select_frames(src).audio.start is None  # whole track, stream copy
    out = _copy(videos["av"], tmp_path / "out.mp4")
    assert (out.size, out.frame_count, out.fps, out.audio_codec) == (src.size, 30, NTSC, "aac")
    assert [out.frame_time(i) for i in range(30)] == [src.frame_time(i) for i in range(30)]
    assert abs(_audio_seconds(out.path) - _audio_seconds(src.path)) <= AAC_FRAME
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temp files left


def test_trimmed_copy_has_matching_frames_and_audio_span(videos, tmp_path):
    full = list(read_frames(videos["av"]))
    trimmed = list(read_frames(videos["av"], start=0.3, end=0.7))
    # frame i is at i * 1001/30000 s: [0.3, 0.7) holds frames 9..20
    assert len(trimmed) == 12
    assert all(np.array_equal(a, b) for a, b in zip(trimmed, full[9:21], strict=True))
    out = _copy(videos["av"], tmp_path / "cut.mp4", start=0.3, end=0.7)
    assert (out.frame_count, out.fps) == (12, NTSC)
    assert abs(_audio_seconds(out.path) - 12 / NTSC) <= AAC_FRAME  # not the whole 1.001 s


def test_every_and_max_frames_select_and_rescale_rate(videos):
    info = probe(videos["av"])
    full = list(read_frames(videos["av"], info=info))
    halves = list(read_frames(videos["av"], info=info, every=2))
    assert all(np.array_equal(a, b) for a, b in zip(halves, full[::2], strict=True))
    assert select_frames(info, every=2).fps == NTSC / 2
    assert not select_frames(info, every=2).trimmed
    first = list(read_frames(videos["av"], info=info, max_frames=5))
    assert all(np.array_equal(a, b) for a, b in zip(first, full[:5], strict=True))
    assert select_frames(info, max_frames=5).audio.start == 0  # cut, not the whole track


def test_odd_size_without_audio_is_kept_exactly(videos, tmp_path):
    src = probe(videos["odd"])
    assert (src.size, src.audio_codec, src.fps) == ((97, 65), None, 25)
    out = _copy(videos["odd"], tmp_path / "odd.mp4")
    assert (out.size, out.frame_count, out.audio_codec) == ((97, 65), 10, None)
    colour = np.zeros((65, 97, 3), np.uint8) + np.array([200, 60, 30], np.uint8)
    with VideoWriter(tmp_path / "flat.mp4", fps=25) as writer:
        for _ in range(3):
            writer.write(colour)
    back = list(read_frames(tmp_path / "flat.mp4"))
    assert len(back) == 3 and back[0].shape == (65, 97, 3)
    # RGB order and colour matrix: a swapped channel or the wrong matrix is off by tens of
    # levels; yuv420p rounding of a flat colour by at most a few (0 measured)
    assert np.abs(back[1].astype(int) - colour).mean() < 3
    assert np.abs(back[1].astype(int) - colour).max() <= 3


def test_variable_frame_rate_is_flagged_and_written_at_the_average_rate(videos, tmp_path):
    info = probe(videos["vfr"])
    assert info.vfr and info.frame_count == 20 and "variable frame rate" in info.warnings[0]
    assert info.fps == pytest.approx(20 / info.duration, rel=1e-3)
    out = _copy(videos["vfr"], tmp_path / "cfr.mp4")
    assert (out.frame_count, out.vfr) == (20, False)


def test_rotation_is_reported_and_frames_come_upright(videos, tmp_path):
    rotated = tmp_path / "rot.mp4"
    _ffmpeg("-display_rotation:v:0", "90", "-i", str(videos["av"]), "-c", "copy", str(rotated))
    info = probe(rotated)
    assert (info.rotation, info.size) == (90, (64, 96))
    assert next(read_frames(rotated, info=info)).shape == (96, 64, 3)


def test_bad_inputs_raise_input_error_naming_the_file(videos, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    with pytest.raises(InputError, match="notes.mp4"):
        probe(text)
    with pytest.raises(InputError, match="no such file"):
        probe(tmp_path / "missing.mp4")
    sound = tmp_path / "sound.m4a"
    _ffmpeg("-f", "lavfi", "-t", "0.2", "-i", "sine", str(sound))
    with pytest.raises(InputError, match="no video stream"):
        probe(sound)
    with pytest.raises(InputError, match="no frames"):
        read_frames(videos["av"], start=5.0)


def test_bad_options_raise_usage_error(videos, tmp_path):
    with pytest.raises(UsageError, match="every"):
        read_frames(videos["av"], every=0)
    with pytest.raises(UsageError, match="end"):
        read_frames(videos["av"], start=0.5, end=0.2)
    with pytest.raises(UsageError, match=".avi"):
        VideoWriter(tmp_path / "out.avi", fps=25)
    with pytest.raises(UsageError, match="nope"):
        VideoWriter(tmp_path / "out.mp4", fps=25, codec="nope")
    with pytest.raises(UsageError, match="0..51"):
        VideoWriter(tmp_path / "out.mp4", fps=25, crf=70)


def test_interrupted_writer_leaves_no_output_and_no_temp_file(videos, tmp_path):
    info = probe(videos["av"])
    selection = select_frames(info)
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "out.mp4", fps=selection.fps, audio=selection.audio) as w:
            for index, frame in enumerate(read_frames(videos["av"], info=info)):
                if index == 5:
                    raise KeyboardInterrupt
                w.write(frame)
    assert list(tmp_path.iterdir()) == []


def test_frame_pngs_are_zero_padded_and_lossless(tmp_path):
    frames = [np.full((8, 9, 3), value, np.uint8) for value in (0, 128, 255)]
    (tmp_path / "frames").mkdir()
    for index, frame in enumerate(frames):
        write_frame_png(frame, tmp_path / "frames", "clip", index)
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == ["clip_000000.png", "clip_000001.png", "clip_000002.png"]
    back = np.asarray(Image.open(tmp_path / "frames" / "clip_000001.png"))
    assert np.array_equal(back, frames[1])


def test_streaming_memory_stays_flat(tmp_path):
    src, out = tmp_path / "long.mp4", tmp_path / "long_out.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=30", "-frames:v", "600", str(src))
    info = probe(src)
    all_frames_bytes = 600 * 64 * 64 * 3  # 7.4 MB if frames piled up in a list
    tracemalloc.start()
    try:
        with VideoWriter(out, fps=info.fps) as writer:
            for frame in read_frames(src, info=info):
                writer.write(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert writer.frames_written == 600 and probe(out).frame_count == 600
    assert peak < all_frames_bytes / 8
