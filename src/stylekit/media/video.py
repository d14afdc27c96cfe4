"""Streaming video I/O on the ffmpeg that ships with imageio-ffmpeg: probe, read, write.

Frames stream through ffmpeg pipes one at a time (constant memory). Frame timing is taken from
the container's packet timestamps (`ffmpeg -c copy -f framecrc`, no decoding), so rates such as
30000/1001 are exact `Fraction`s and an untrimmed round trip keeps every frame timestamp.

Decisions:
- Odd frame sizes: libx264/libx265 cannot encode 4:2:0 at odd sizes, so those sizes are encoded
  as yuv444p (High 4:4:4) instead of being padded, cropped or rescaled; the output keeps the input
  size exactly. Even sizes use yuv420p. Some players (browsers, QuickTime) do not play 4:4:4.
- Variable frame rate input is written at constant frame rate: the same frames, one output frame
  per input frame, at the average rate (frame count / duration). `VideoInfo.warnings` says so
  and how far the timestamps move; the CLI shows it.
- Audio: an untrimmed selection whose first frame starts at 0 copies the whole audio track
  (stream copy when the output container takes the codec, otherwise AAC / Opus). A trimmed one
  cuts exactly the written span, [first frame time, + frames written / fps), which needs a
  decode, so it is re-encoded (AAC, Opus for .webm). Audio is added in a second ffmpeg pass that
  copies the encoded video.
- Outputs are written to hidden `.<stem>.part<ext>` files next to the destination and moved
  into place with `os.replace` only when complete; errors and interrupts leave nothing behind.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

from stylekit.errors import InputError, StylekitError, UsageError
from stylekit.media.ffmpeg import ffmpeg_exe, ffmpeg_reason
from stylekit.media.metadata import VIDEO_SUFFIXES, save_options, settings_json

# Encoders with a constant-quality -crf option, and the default each gets (visually lossless-ish).
CRF_DEFAULTS = {"libx264": 18, "libx265": 20, "libvpx-vp9": 30, "libaom-av1": 30, "libsvtav1": 30}
WEBM_CODECS = ("libvpx-vp9", "libvpx", "libaom-av1", "libsvtav1", "librav1e")
# Audio codecs the MP4/MOV muxer takes as a stream copy; others are re-encoded.
MP4_AUDIO = ("aac", "mp3", "ac3", "eac3", "alac", "opus", "flac")
WEBM_AUDIO = ("opus", "vorbis")
PNG_DIGITS = 6


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a video: display size, exact timing, audio."""

    path: Path
    width: int  # display size: after the rotation ffmpeg applies when decoding
    height: int
    fps: Fraction  # exact for constant rate; the average rate when `vfr`
    frame_count: int
    duration: float  # seconds of video: last frame time - first frame time + one frame
    codec: str
    audio_codec: str | None  # None: no audio stream
    vfr: bool
    rotation: int  # display-matrix rotation in degrees counter-clockwise, 0 when none
    time_base: Fraction = field(repr=False)
    pts: tuple[int, ...] = field(repr=False)  # sorted frame timestamps in `time_base` units
    warnings: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None

    def frame_time(self, index: int) -> Fraction:
        """Timestamp of frame `index` in seconds on the file's timeline (what players show)."""
        return self.pts[index] * self.time_base


@dataclass(frozen=True)
class AudioSpan:
    """Audio a `VideoWriter` takes from a source file: the whole track, or a cut from `start`."""

    path: Path
    codec: str
    start: Fraction | None = None  # None: whole track; else cut [start, start + video duration)


@dataclass(frozen=True)
class FrameSelection:
    """Which source frames `read_frames` yields, at what rate, and the audio that goes with them."""

    indices: range  # source frame indices, in order
    fps: Fraction  # effective output rate: source rate / every
    trimmed: bool
    audio: AudioSpan | None

    @property
    def count(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------- probe


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's size, exact frame rate, frame count and timestamps, and its audio codec.

    Reads the whole file once without decoding (packet timestamps via `-c copy -f framecrc`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-fflags", "+genpts"]
    cmd += ["-i", str(path), "-map", "0:V:0", "-c", "copy", "-f", "framecrc", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    stderr = proc.stderr.decode("utf-8", "replace")
    header = _input_header(stderr)
    stream = _video_stream_line(header)
    if proc.returncode != 0 or stream is None:
        reason = "no video stream" if stream is None and header else ffmpeg_reason(stderr)
        raise InputError(f"{path}: not a readable video ({reason})")
    time_base, pts, last_duration = _parse_framecrc(proc.stdout.decode("ascii", "replace"))
    if not pts:
        raise InputError(f"{path}: not a readable video (no video frames)")
    return _build_info(path, header, stream, time_base, pts, last_duration)


def _build_info(
    path: Path,
    header: list[str],
    stream: str,
    time_base: Fraction | None,
    pts: list[int],
    last_duration: int | None,
) -> VideoInfo:
    header_rates = _header_rates(stream)
    if time_base is None:  # no usable timestamps: assume the header's constant rate
        time_base = 1 / (header_rates[0] if header_rates else Fraction(25))
        pts, last_duration = list(range(len(pts))), 1
    fps, shift = _frame_rate(pts, time_base, last_duration, header_rates)
    width, height = _frame_size(stream)
    rotation = _rotation(header, stream)
    if rotation in (90, 270):
        width, height = height, width
    last = (last_duration or 0) * time_base or 1 / fps
    duration = (pts[-1] - pts[0]) * time_base + last
    warnings = ()
    if shift is not None:
        warnings = (
            f"{path.name} has a variable frame rate; writing its {len(pts)} frames at a constant "
            f"{float(fps):.3f} fps (frame times move by up to {shift * 1000:.0f} ms)",
        )
    return VideoInfo(
        path=path,
        width=width,
        height=height,
        fps=fps,
        frame_count=len(pts),
        duration=float(duration),
        codec=stream.split(" Video: ", 1)[1].split()[0].rstrip(","),
        audio_codec=_audio_codec(header),
        vfr=shift is not None,
        rotation=rotation,
        time_base=time_base,
        pts=tuple(pts),
        warnings=warnings,
    )


def _input_header(stderr: str) -> list[str]:
    """The `Input #0` section of ffmpeg's log: container, streams, side data."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Input #0")), None)
    if start is None:
        return []
    stop = next(
        (i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines)
    )
    return lines[start:stop]


def _video_stream_line(header: list[str]) -> str | None:
    """The first video stream that is not cover art: what `-map 0:V:0` selects."""
    for line in header:
        if re.match(r"\s*Stream #0:\d+\S*: Video: ", line) and "(attached pic)" not in line:
            return line
    return None


def _audio_codec(header: list[str]) -> str | None:
    for line in header:
        match = re.match(r"\s*Stream #0:\d+\S*: Audio: ([\w-]+)", line)
        if match:
            return match.group(1)
    return None


def _frame_size(stream: str) -> tuple[int, int]:
    match = re.search(r"[ ,](\d+)x(\d+)[ ,\[]", stream + " ")
    if match is None:
        raise InputError(f"no frame size in ffmpeg's stream line: {stream.strip()}")
    return int(match.group(1)), int(match.group(2))


def _rotation(header: list[str], stream: str) -> int:
    """The display matrix in the side data printed under the video stream's line."""
    for line in header[header.index(stream) + 1 :]:
        if re.match(r"\s*Stream #", line):
            break
        match = re.search(r"rotation of (-?[\d.]+) degrees", line, re.IGNORECASE)
        if match:
            return round(float(match.group(1))) % 360
    return 0


def _header_rates(stream: str) -> list[Fraction]:
    """The `tbr` then `fps` values of the stream line, printed to 2 decimals, made exact."""
    rates = []
    for unit in ("tbr", "fps"):
        match = re.search(rf"([\d.]+)(k?) {unit}\b", stream)
        if match:
            value = Fraction(match.group(1)) * (1000 if match.group(2) else 1)
            rates.append(_exact_rate(value))
    return [rate for rate in rates if rate > 0]


def _exact_rate(value: Fraction) -> Fraction:
    """Undo ffmpeg's 2-decimal rounding of NTSC rates: 29.97 -> 30000/1001."""
    if value.denominator == 1:
        return value
    ntsc = Fraction(round(value * Fraction(1001, 1000)) * 1000, 1001)
    return ntsc if abs(ntsc - value) < Fraction(1, 200) else value


def _parse_framecrc(text: str) -> tuple[Fraction | None, list[int], int | None]:
    """Time base, sorted presentation timestamps and the last frame's duration from framecrc."""
    time_base, packets = None, []
    for line in text.splitlines():
        if line.startswith("#tb 0:"):
            time_base = Fraction(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#"):
            fields = [part.strip() for part in line.split(",")]
            packets.append((int(fields[2]), int(fields[3])))
    packets.sort()
    pts = [stamp for stamp, _ in packets]
    if any(stamp == -(2**63) for stamp in pts):  # AV_NOPTS_VALUE: timestamps unknown
        return None, pts, None
    return time_base, pts, packets[-1][1] if packets else None


def _frame_rate(pts, time_base, last_duration, header_rates) -> tuple[Fraction, float | None]:
    """The exact constant rate whose grid the timestamps sit on (within one tick), else the
    average rate and the largest timestamp shift (seconds) that rate causes."""
    n = len(pts)
    if n < 2:
        return (header_rates[0] if header_rates else Fraction(25)), None
    mean_rate = (n - 1) / ((pts[-1] - pts[0]) * time_base) if pts[-1] != pts[0] else None
    candidates = [*header_rates, *([_exact_rate(mean_rate), mean_rate] if mean_rate else [])]
    for rate in candidates:
        if _grid_error(pts, time_base, rate) <= float(time_base) * 1.01:
            return rate, None
    last = (last_duration or 0) * time_base or (pts[-1] - pts[0]) * time_base / (n - 1)
    average = (n / ((pts[-1] - pts[0]) * time_base + last)).limit_denominator(10_000)
    return average, _grid_error(pts, time_base, average)


def _grid_error(pts, time_base, rate: Fraction) -> float:
    """Largest distance (seconds) between a frame's time and the constant-rate grid."""
    tb, step, first = float(time_base), 1 / float(rate), pts[0]
    return max(abs((stamp - first) * tb - i * step) for i, stamp in enumerate(pts))


# ----------------------------------------------------------------------------------------- read


def select_frames(
    info: VideoInfo,
    *,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
    every: int = 1,
) -> FrameSelection:
    """Frames with timestamps in [start, end), every `every`-th from the first, at most
    `max_frames` of them; the output rate is the source rate / `every`."""
    check_selection(start, end, max_frames, every)
    first, stop = 0, info.frame_count
    if start is not None:
        first = bisect_left(info.pts, math.ceil(Fraction(str(start)) / info.time_base))
    if end is not None:
        stop = bisect_left(info.pts, math.ceil(Fraction(str(end)) / info.time_base))
    indices = range(first, stop, every)[:max_frames]
    if not indices:
        raise InputError(
            f"{info.path}: no frames in the selected span (start={start}, end={end}); "
            f"the video has {info.frame_count} frames over {info.duration:.3f} s"
        )
    trimmed = first > 0 or indices[-1] + every < info.frame_count
    audio = None
    if info.audio_codec is not None:
        cut = trimmed or info.pts[0] != 0
        begin = max(info.frame_time(first), Fraction(0)) if cut else None
        audio = AudioSpan(info.path, info.audio_codec, begin)
    return FrameSelection(indices=indices, fps=info.fps / every, trimmed=trimmed, audio=audio)


def check_selection(start, end, max_frames, every) -> None:
    if start is not None and start < 0:
        raise UsageError(f"start must be >= 0 seconds, got {start}")
    if end is not None and end <= (start or 0):
        raise UsageError(f"end must be after start ({start or 0} s), got {end}")
    if max_frames is not None and max_frames < 1:
        raise UsageError(f"max_frames must be >= 1, got {max_frames}")
    if every < 1:
        raise UsageError(f"every must be >= 1, got {every}")


def read_frames(
    path: str | os.PathLike,
    *,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
    every: int = 1,
    info: VideoInfo | None = None,
) -> Iterator[np.ndarray]:
    """Stream the selected frames (see `select_frames`) as (H, W, 3) uint8 RGB arrays.

    Probes first (pass `info` to reuse a probe), so bad files and bad options raise here, not at
    the first `next()`. Frames outside the selection are dropped inside ffmpeg.
    """
    info = info if info is not None else probe(path)
    selection = select_frames(info, start=start, end=end, max_frames=max_frames, every=every)
    return _decode(Path(path), selection, info.size)


def _decode(path: Path, selection: FrameSelection, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Run ffmpeg and read raw RGB frames of `size` (W, H) off its stdout.

    ffmpeg and its pipes are closed however the consumer stops, early or at the end
    (imageio-ffmpeg's reader leaves both pipes open when ffmpeg has already exited: a
    ResourceWarning on every video read to its end)."""
    width, height = size
    frame_bytes = width * height * 3
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path)]
    cmd += ["-map", "0:V:0", "-fps_mode", "passthrough", *_select_filter(selection.indices)]
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    done = 0
    with (
        tempfile.TemporaryFile() as log,
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log) as proc,
    ):
        try:
            while done < selection.count:
                data = proc.stdout.read(frame_bytes)
                if len(data) < frame_bytes:
                    break
                yield np.frombuffer(data, np.uint8).reshape(height, width, 3).copy()  # (H, W, 3)
                done += 1
        except BaseException:  # the consumer stopped early (GeneratorExit) or an interrupt
            proc.kill()  # `with` then closes the pipe and reaps ffmpeg
            raise
        if done == selection.count:
            proc.kill()  # the rest is not wanted (a no-op when ffmpeg has finished)
        elif proc.wait() != 0:
            log.seek(0)
            reason = ffmpeg_reason(log.read().decode("utf-8", "replace"))
            raise InputError(f"{path}: decoding failed after {done} frames ({reason})")


def _select_filter(indices: range) -> list[str]:
    """ffmpeg `select` on the decoded frame number n, so skipped frames never reach the pipe."""
    if indices.start == 0 and indices.step == 1:
        return []  # a prefix: reading stops after the last frame
    a, last, step = indices.start, indices[-1], indices.step
    keep = f"between(n,{a},{last})" + (f"*not(mod(n-{a},{step}))" if step > 1 else "")
    return ["-vf", f"select='{keep}'"]


# ---------------------------------------------------------------------------------------- write


class _Abort(BaseException):
    """Thrown into imageio's writer generator so that it kills ffmpeg instead of finishing."""


class VideoWriter:
    """Encode frames as they come; the file appears at `path` only once complete.

    with VideoWriter("out.mp4", fps=selection.fps, audio=selection.audio) as writer:
        for frame in frames:
            writer.write(frame)

    `codec` defaults to libx264 (libvpx-vp9 for .webm); `crf` to the codec's entry in
    `CRF_DEFAULTS`. Frames are (H, W, 3) uint8 RGB, all the size of the first.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fps: Fraction | int | float,
        codec: str | None = None,
        crf: int | None = None,
        audio: AudioSpan | None = None,
        metadata: dict | None = None,
    ):
        self.path = Path(path)
        self.metadata = metadata
        self.suffix = self.path.suffix.lower()
        if self.suffix not in VIDEO_SUFFIXES:
            raise UsageError(
                f"video output {self.path} must end in one of {', '.join(VIDEO_SUFFIXES)}"
            )
        self.fps = Fraction(str(fps)) if isinstance(fps, float) else Fraction(fps)
        if self.fps <= 0:
            raise UsageError(f"fps must be > 0, got {fps}")
        self.codec = codec or ("libvpx-vp9" if self.suffix == ".webm" else "libx264")
        self.crf = _check_codec(self.codec, crf, self.suffix)
        self.audio = audio
        self.frames_written = 0
        self.size: tuple[int, int] | None = None
        self._part = self.path.with_name(f".{self.path.stem}.part{self.path.suffix}")
        self._video_part = self.path.with_name(f".{self.path.stem}.video.part{self.path.suffix}")
        self._encoder = None
        self._closed = False

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frame: np.ndarray) -> None:
        """Send one (H, W, 3) uint8 RGB frame to the encoder."""
        frame = _check_frame(frame, self.size)
        if self._encoder is None:
            self._start(frame)
        try:
            self._encoder.send(np.ascontiguousarray(frame))
        except OSError as err:
            self.abort()
            raise StylekitError(
                f"ffmpeg could not encode {self.path} with codec {self.codec} "
                f"(see ffmpeg's message above)"
            ) from err
        self.frames_written += 1

    def close(self) -> Path:
        """Finish encoding, add the audio, check the frame count, move the file into place."""
        if self._closed:
            return self.path
        if self._encoder is None:
            self.abort()
            raise StylekitError(f"no frames were written to {self.path}")
        try:
            self._encoder.close()  # waits for ffmpeg to finish the file
            self._encoder = None
            if self.audio is not None:
                self._mux_audio()
            self._verify()
            os.replace(self._part, self.path)
            self._closed = True
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial files; nothing appears at `path`."""
        if self._encoder is not None:
            try:
                self._encoder.throw(_Abort)
            except (_Abort, StopIteration, OSError):
                pass
            self._encoder = None
        for part in (self._part, self._video_part):
            part.unlink(missing_ok=True)

    def _start(self, frame: np.ndarray) -> None:
        height, width = frame.shape[:2]
        self.size = (width, height)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        target, container = self._part, self._container_args()
        if self.audio is not None:  # the audio pass writes the final container
            target, container = self._video_part, []
        self._encoder = imageio_ffmpeg.write_frames(
            str(target),
            (width, height),
            fps=self.fps,
            codec=self.codec,
            pix_fmt_out=_pix_fmt(self.codec, width, height),
            quality=None,
            macro_block_size=1,  # never rescale to a multiple of 16
            ffmpeg_log_level="error",
            output_params=[
                *self._quality_args(),
                *_bt709_args(),
                *self._metadata_args(),
                *container,
            ],
        )
        self._encoder.send(None)

    def _quality_args(self) -> list[str]:
        if self.crf is None:
            return []
        zero_bitrate = ["-b:v", "0"] if self.codec in ("libvpx-vp9", "libaom-av1") else []
        return ["-crf", str(self.crf), *zero_bitrate]

    def _metadata_args(self) -> list[str]:
        """The settings as the container's `comment` tag (JSON; `read_video_settings` reads it)."""
        if not self.metadata:
            return []
        return ["-metadata", f"comment={settings_json(self.metadata)}"]

    def _container_args(self) -> list[str]:
        return ["-movflags", "+faststart"] if self.suffix in (".mp4", ".m4v", ".mov") else []

    def _mux_audio(self) -> None:
        """Second pass: copy the encoded video, add the source's audio (whole or cut)."""
        audio, cut = self.audio, self.audio.start is not None
        span = []
        if cut:
            seconds = self.frames_written / self.fps
            span = ["-ss", f"{float(audio.start):.6f}", "-t", f"{float(seconds):.6f}"]
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
        cmd += ["-i", str(self._video_part), *span, "-i", str(audio.path)]
        cmd += ["-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy"]
        cmd += [*_audio_args(self.suffix, audio.codec, cut), *self._metadata_args()]
        cmd += self._container_args()
        proc = subprocess.run([*cmd, str(self._part)], capture_output=True)
        if proc.returncode != 0:
            reason = ffmpeg_reason(proc.stderr.decode("utf-8", "replace"))
            raise StylekitError(f"could not add the audio of {audio.path} to {self.path}: {reason}")
        self._video_part.unlink()

    def _verify(self) -> None:
        """ffmpeg's exit status is not reported by imageio: check the file holds every frame."""
        try:
            written = probe(self._part).frame_count
        except InputError as err:
            raise StylekitError(f"ffmpeg did not produce a valid {self.path}: {err}") from err
        if written != self.frames_written:
            raise StylekitError(
                f"ffmpeg wrote {written} of {self.frames_written} frames to {self.path}"
            )


def _check_frame(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    if size is not None and (frame.shape[1], frame.shape[0]) != size:
        raise ValueError(f"frame size {frame.shape[1]}x{frame.shape[0]} differs from {size}")
    return frame


@lru_cache(maxsize=1)
def _encoders() -> frozenset[str]:
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True)
    lines = proc.stdout.decode("utf-8", "replace").split("------", 1)[-1].splitlines()
    return frozenset(line.split()[1] for line in lines if line.strip().startswith("V"))


def _check_codec(codec: str, crf: int | None, suffix: str) -> int | None:
    """Validate codec and crf for this container; return the crf to use (None: codec default)."""
    if codec not in _encoders():
        common = [name for name in CRF_DEFAULTS if name in _encoders()]
        raise UsageError(f"unknown video codec {codec!r}; try one of {', '.join(common)}")
    if suffix == ".webm" and codec not in WEBM_CODECS:
        raise UsageError(f"codec {codec!r} cannot go in .webm; use one of {', '.join(WEBM_CODECS)}")
    if crf is None:
        return CRF_DEFAULTS.get(codec)
    if codec not in CRF_DEFAULTS:
        raise UsageError(
            f"crf is not supported by codec {codec!r}; it is by {', '.join(CRF_DEFAULTS)}"
        )
    top = 51 if codec in ("libx264", "libx265") else 63
    if not 0 <= crf <= top:
        raise UsageError(f"crf for {codec} must be in 0..{top}, got {crf}")
    return crf


def _pix_fmt(codec: str, width: int, height: int) -> str:
    """4:2:0 unless x264/x265 would refuse an odd size: then 4:4:4 keeps the size exact."""
    odd = width % 2 or height % 2
    return "yuv444p" if odd and codec in ("libx264", "libx265") else "yuv420p"


def _bt709_args() -> list[str]:
    """Convert RGB with the BT.709 matrix and tag it, so players do not guess the colours."""
    tags = "setparams=range=tv:colorspace=bt709:color_primaries=bt709:color_trc=bt709"
    return ["-vf", f"scale=out_color_matrix=bt709:out_range=tv,{tags}"]


def _audio_args(suffix: str, codec: str, cut: bool) -> list[str]:
    """Stream copy when whole and the container takes the codec; else AAC (Opus for .webm)."""
    if suffix == ".webm":
        keeps, encoder = WEBM_AUDIO, ["-c:a", "libopus", "-b:a", "160k"]
    elif suffix == ".mkv":
        keeps, encoder = (codec,), ["-c:a", "aac", "-b:a", "192k"]
    else:
        keeps, encoder = MP4_AUDIO, ["-c:a", "aac", "-b:a", "192k"]
    return ["-c:a", "copy"] if codec in keeps and not cut else encoder


# ------------------------------------------------------------------------------------ frames dir


def write_frame_png(
    frame: np.ndarray,
    out_dir: str | os.PathLike,
    stem: str,
    index: int,
    *,
    metadata: dict | None = None,
) -> Path:
    """Write `<stem>_<index:06d>.png` atomically (hidden temp file, then rename), with
    `metadata` and the frame's number (`frame`) in the chunks an image output has."""
    out_dir = Path(out_dir)
    target = out_dir / f"{stem}_{index:0{PNG_DIGITS}d}.png"
    part = out_dir / f".{target.name}.part"
    options = save_options("png", metadata | {"frame": index}) if metadata else {}
    try:
        image = Image.fromarray(_check_frame(frame, None))
        image.save(part, format="PNG", compress_level=1, **options)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return target


# ------------------------------------------------------------------------------------- settings
