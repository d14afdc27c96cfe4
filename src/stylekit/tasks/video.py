"""`stylekit video`: stylise video files frame by frame into videos or PNG frame folders.

    from stylekit.tasks.video import stylize_video
    report = stylize_video(["clips/"], preset="lcm-sd15", consistency="bank", seed=1)

Same batch contract as `stylize`: outputs go to `-o OUT` (default ./stylized/), mirroring
folder inputs, as `<stem><suffix>.mp4` (`fmt` picks mp4, m4v, mov, mkv or webm; one input
and `-o clip.mp4` names the file); with `frames_out=DIR` each video becomes a folder
`DIR/<stem><suffix>/` of `<stem><suffix>_000000.png`, ... instead. Existing outputs are skipped
(resume) unless `overwrite`; outputs appear only when complete (a video through `VideoWriter`'s
hidden part file, a frame folder as a hidden `.NAME.part` folder renamed at the end), so an
error or Ctrl-C leaves nothing half-written. A broken or non-video input fails alone and the
batch goes on (exit code 1); usage errors stop it before the model loads (exit code 2).

Frames run at the working size (`media.images.Sizing`: by default scaled down to the model's
native pixel budget, aspect kept; a frame within it runs at its own size, padded to multiples of 8
by the stream and cropped back) and are written at the input's size, resampled back (Lanczos),
unless `keep_size=False` asks for the working size.

With `tiled` (`--tiled`) every frame runs at its own size over MultiDiffusion windows of the
model's native size with the tiled VAE (`FrameStream(windows=)`), one frame at a time (no
stream batch) in memory bounded by the window batch; anchor and bank consistency and residual CFG
(`cfg_mode` self, initialize) are refused then.

With a motion adapter (`settings.motion_adapter`, `--motion-adapter`) the UNet is AnimateDiff's
motion UNet and frames are denoised jointly in windows of `context_frames` overlapping by
`context_overlap` (`stylekit.engine.motion.MotionStream`; the bank, residual CFG and
ControlNet maps, computed per frame, and AD guidance, refining a window's frames jointly
(`engine/motion_ad.py`), work per window); anchor, the similarity filter, stream batch and
`tiled` are refused there.

The model loads once per batch and the prompt/style conditioning is computed once; video i gets
seed base + i, which fixes its noise (see `stylekit.engine.stream`). Progress is reported in
frames: `events.step(done, total)` once per output frame, so a caller can show fps and an ETA;
variable-frame-rate warnings go to `events.warning(message)` when the events object has one,
and always into the record's settings (`--json`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from stylekit.control import ControlImage, control_image_finder, read_control_image
from stylekit.engine.motion import (
    CONTEXT_FRAMES,
    CONTEXT_OVERLAP,
    MotionOptions,
    MotionStats,
    MotionStream,
)
from stylekit.engine.stream import FrameStream, StreamOptions
from stylekit.errors import StylekitError, UsageError
from stylekit.media.batch import (
    DEFAULT_OUT_DIR,
    BatchReport,
    Job,
    collect_inputs,
    output_root,
    refuse_overwriting_files,
    refuse_overwriting_inputs,
    unique_outputs,
)
from stylekit.media.images import Sizing
from stylekit.media.video import (
    VIDEO_SUFFIXES,
    VideoInfo,
    VideoWriter,
    check_selection,
    probe,
    read_frames,
    select_frames,
    write_frame_png,
)
from stylekit.presets import Settings
from stylekit.progress import ConsoleEvents
from stylekit.runner import Events, Output, run_jobs
from stylekit.session import (
    LazySession,
    Runtime,
    Session,
    image_work,
    planned_native_px,
    resolve_settings,
    size_flag_check,
    size_notice,
    with_seed,
)
from stylekit.tasks.stylize import Tiled

VIDEO_FORMATS = {"mp4": ".mp4", "m4v": ".m4v", "mov": ".mov", "mkv": ".mkv", "webm": ".webm"}
ANCHOR_EVERY = 30  # a fresh anchor about once a second at 30 fps (see StreamOptions)


@dataclass(frozen=True)
class Clip:
    """Which frames of each video, at what size, encoded how."""

    start: float | None = None
    end: float | None = None
    max_frames: int | None = None
    every: int = 1
    size: tuple[int, int] | None = None  # (W, H): run every frame at exactly this size
    max_size: int | None = None  # run with the longer side at most this
    codec: str | None = None
    crf: int | None = None
    max_pixels: int | None = None  # run at most this many pixels; None native², 0 no cap
    keep_size: bool = True  # write frames at the input's size (else at the working size)

    @property
    def sizing(self) -> Sizing:
        return Sizing(self.size, self.max_size, self.max_pixels, self.keep_size)

    def check(self) -> Clip:
        check_selection(self.start, self.end, self.max_frames, self.every)
        self.sizing.check()
        return self

    def working(self, size: tuple[int, int], native: int) -> tuple[int, int]:
        """The frames' working size: `size` itself when it is within the bounds (the stream pads
        it to multiples of 8 and crops back), else the `Sizing` rule's."""
        sizing = self.sizing
        if sizing.size is None and sizing.scale(size, native) >= 1.0:
            return size
        return sizing.working(size, native)

    def selection_args(self) -> dict:
        return dict(start=self.start, end=self.end, max_frames=self.max_frames, every=self.every)


# --- planning ----------------------------------------------------------------------------------


def video_extension(fmt: str | None) -> str:
    """The container extension for `fmt` (None: mp4)."""
    name = (fmt or "mp4").lower().lstrip(".")
    if name not in VIDEO_FORMATS:
        raise UsageError(f"unknown video format {fmt!r}; use one of: {', '.join(VIDEO_FORMATS)}")
    return VIDEO_FORMATS[name]


def plan_videos(inputs: Sequence[str], output: Output, frames_out: Path | None = None) -> list[Job]:
    """Collect video inputs and name their outputs (videos, or frame folders with `frames_out`)."""
    root = Path(frames_out) if frames_out is not None else output.out
    items = collect_inputs(list(inputs), kinds=VIDEO_SUFFIXES, exclude=output_root(root))
    if frames_out is not None:
        if output.out is not None:
            raise UsageError("give either -o (videos) or --frames-out (PNG frames), not both")
        if output.fmt not in (None, "png"):
            raise UsageError(
                f"--frames-out writes PNG frames; --format {output.fmt} does not apply"
            )
        root, ext = Path(frames_out), ""
    else:
        root = DEFAULT_OUT_DIR if output.out is None else Path(output.out)
        if root.suffix.lower() in VIDEO_SUFFIXES and not root.is_dir():
            if len(items) != 1:
                raise UsageError(f"-o {root} names one file but there are {len(items)} inputs")
            if output.fmt is not None and video_extension(output.fmt) != root.suffix.lower():
                raise UsageError(
                    f"-o {root} is a {root.suffix.lower()[1:]} file but --format is "
                    f"{output.fmt}; drop --format or give -o the extension you want"
                )
            jobs = [Job(items[0].path, root, items[0].rel, 0)]
            refuse_overwriting_inputs(jobs)
            return jobs
        ext = video_extension(output.fmt)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root}: is a file, not a folder")
    paths = unique_outputs(items, root, ext, output.suffix)
    folder = frames_out is not None
    jobs = [
        Job(i.path, p, i.rel, n, folder=folder)
        for n, (i, p) in enumerate(zip(items, paths, strict=True))
    ]
    refuse_overwriting_inputs(jobs)
    return jobs


def check_encoding(jobs: Sequence[Job], clip: Clip, frames_out: Path | None) -> None:
    """Refuse a bad codec/crf for the outputs' containers before any model loads."""
    if frames_out is not None:
        if clip.codec is not None or clip.crf is not None:
            raise UsageError("--codec and --crf do not apply to --frames-out (PNG frames)")
        return
    for suffix in sorted({job.output.suffix.lower() for job in jobs}):
        VideoWriter(Path(f"check{suffix}"), fps=1, codec=clip.codec, crf=clip.crf)  # validates


# --- writing -----------------------------------------------------------------------------------


@contextlib.contextmanager
def video_sink(
    job: Job, selection, clip: Clip, settings: dict | None = None
) -> Iterator[Callable[[np.ndarray], None]]:
    """Yield `write(frame)` into a video that appears at `job.output` only when complete, with
    `settings` in its container's `comment` tag."""
    with VideoWriter(
        job.output,
        fps=selection.fps,
        codec=clip.codec,
        crf=clip.crf,
        audio=selection.audio,
        metadata=settings,
    ) as writer:
        yield writer.write


@contextlib.contextmanager
def frames_sink(
    target: Path, settings: dict | None = None
) -> Iterator[Callable[[np.ndarray], None]]:
    """Yield `write(frame)` into a hidden part folder renamed to `target` when complete; every
    frame carries `settings` (and its `frame` number) as an image output does."""
    part = target.with_name(f".{target.name}.part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    count = 0

    def write(frame: np.ndarray) -> None:
        nonlocal count
        write_frame_png(frame, part, target.name, count, metadata=settings)
        count += 1

    try:
        yield write
        replace_dir(part, target)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise


def replace_dir(part: Path, target: Path) -> None:
    """Move a finished folder into place, replacing an old one (--overwrite)."""
    if not target.exists():
        os.replace(part, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(part, target)
    shutil.rmtree(old, ignore_errors=True)


def resized(frames: Iterable[np.ndarray], size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Frames at `size` (W, H), resized with Lanczos where they differ."""
    for frame in frames:
        h, w = frame.shape[:2]
        if (w, h) != tuple(size):
            frame = np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS))
        yield frame


# --- one video ---------------------------------------------------------------------------------


def stylize_one(
    job: Job,
    seed: int,
    session: Session,
    options: StreamOptions,
    clip: Clip,
    *,
    frames_out: Path | None,
    events: Events,
    info: VideoInfo | None = None,
    tiled: Tiled | None = None,
    given: ControlImage | None = None,
    motion: MotionOptions | None = None,
) -> dict:
    """Stylise one video into its output; returns the settings for its record. With controls
    each frame's maps are computed as it streams in (`given`: one precomputed map for all)."""
    info = info or probe(job.input)
    selection = select_frames(info, **clip.selection_args())
    for message in info.warnings:
        warn(events, message)
    working = info.size if tiled is not None else clip.working(info.size, session.native_px)
    windows, extra = None, {}
    if tiled is not None:  # the windows of the frame padded to multiples of 8 by the stream
        from stylekit.engine.windows import Windows

        padded = tuple(-(-side // 8) * 8 for side in working)
        plan = tiled.plan(padded, session.native)
        windows = Windows.of(plan)
        extra = {k: v for k, v in tiled.settings(plan).items() if k != "upscale"}
    control = session.frame_control(given and given.image) if session.controls else None
    if motion is not None:  # frames denoised jointly in context windows (engine/motion.py)
        stream = MotionStream(
            session.model,
            session.cond,
            session.sampler,
            replace(options, seed=seed),
            motion,
            control=control,
            guidance=motion_guidance(session),
        )
        extra = motion_settings(session, motion)
    else:
        stream = FrameStream(
            session.model,
            session.cond,
            session.sampler,
            replace(options, seed=seed),
            guidance=session.guided,
            windows=windows,
            control=control,
        )
    size = info.size if clip.keep_size else working
    settings = session.metadata(seed=seed, size=size, source=job.input.name)
    settings |= {"working_size": "{}x{}".format(*working), "input_size": "{}x{}".format(*info.size)}
    settings |= given.settings() if given else {}
    settings |= video_settings(options, stream, selection, clip) | extra  # in the file too
    done = 0
    with contextlib.ExitStack() as stack:
        sink = (
            frames_sink(job.output, settings)
            if frames_out is not None
            else video_sink(job, selection, clip, settings)
        )
        write = stack.enter_context(sink)
        source = stack.enter_context(
            contextlib.closing(read_frames(job.input, info=info, **clip.selection_args()))
        )
        outputs = stack.enter_context(contextlib.closing(stream.run(resized(source, working))))
        if clip.keep_size:
            outputs = resized(outputs, info.size)
        for frame in outputs:
            write(frame)
            done += 1
            events.step(done, selection.count)
        if done != selection.count:
            raise StylekitError(f"{job.input}: decoded {done} of {selection.count} frames")
    stats = motion_stats(stream.stats) if motion is not None else {}
    return settings | stream_stats(stream, info.warnings) | stats


def video_settings(options: StreamOptions, stream, selection, clip: Clip) -> dict:
    """The video knobs: what a rerun needs besides the session's settings (the file has them)."""
    return {
        "frames": selection.count,
        "fps": str(selection.fps),
        "start": clip.start,
        "end": clip.end,
        "every": clip.every if clip.every != 1 else None,
        "max_frames": clip.max_frames,
        "consistency": options.consistency,
        "anchor_every": options.anchor_every if options.consistency == "anchor" else None,
        "bank_size": options.bank_size if options.consistency == "bank" else None,
        "bank_every": options.bank_every if options.consistency == "bank" else None,
        "cfg_mode": options.cfg_mode,
        "residual_cfg": stream.residual,  # self/initialize with a guided conditioning
        "skip_similar": options.skip_similar,
        "max_skip": options.max_skip if options.skip_similar is not None else None,
        "stream_batch": stream.batched,
    }


def stream_stats(stream, warnings) -> dict:
    """What the stream did, for the record (`--json`), known once the video is written."""
    stats = stream.stats
    return {
        "frames_processed": stats.processed,
        "frames_skipped": stats.skipped,
        "unet_calls": stats.unet_calls,
        "unet_rows": stats.unet_rows or None,  # latent rows through the UNet (tiled: not counted)
        "warnings": list(warnings) or None,
    }


def motion_settings(session: Session, motion: MotionOptions) -> dict:
    """The motion-mode knobs, for the file and the record."""
    return {
        "motion_adapter": session.settings.motion_adapter,
        "context_frames": motion.context,
        "context_overlap": motion.overlap,
    }


def motion_stats(stats: MotionStats) -> dict:
    """What the windows cost, for the record (`--json`), known once the video is written."""
    return {
        "windows": len(stats.windows),
        "unet_rows_per_frame": round(stats.unet_rows / max(stats.frames, 1), 3),
        "peak_frames_held": stats.peak_frames,
    }


def motion_fits(session: Session, motion: MotionOptions) -> None:
    """Refuse windows longer than the loaded motion module's positions, before any video runs."""
    motion.check(getattr(session.model.unet.config, "motion_max_seq_length", None))


def refuse_with_motion(
    consistency: str,
    tiled: Tiled | None,
    skip_similar: float | None,
    stream_batch: bool | None,
) -> None:
    """What motion-module mode cannot combine with, as one usage error each."""
    if tiled is not None:
        raise UsageError("--motion-adapter has no --tiled (windows of frames, not of pixels)")
    if consistency == "anchor":
        raise UsageError(
            "--consistency anchor has no --motion-adapter (the motion module mixes frames "
            "itself); use noise or none"
        )
    if skip_similar is not None:
        raise UsageError("--skip-similar has no --motion-adapter (every frame is in a window)")
    if stream_batch:
        raise UsageError("--stream-batch has no --motion-adapter (the windows are the batch)")


def motion_guidance(session: Session):
    """AD guidance per window (`motion_ad.window_guidance`) when the run has references."""
    if session.references is None:
        return None
    from stylekit.engine.motion_ad import window_guidance

    return window_guidance(session.model, session.references, session.features, session.sampler.ac)


def warn(events: Events, message: str) -> None:
    """Pass a warning to events that show warnings (`warning(message)`); others have the record."""
    show = getattr(events, "warning", None)
    if show is not None:
        show(message)


# --- the batch ---------------------------------------------------------------------------------


def stylize_video(
    inputs: Sequence[str],
    *,
    style: Sequence[str] = (),
    settings: Settings | None = None,
    preset: str | None = None,
    output: Output | None = None,
    runtime: Runtime | None = None,
    codec: str | None = None,
    crf: int | None = None,
    frames_out: str | os.PathLike | None = None,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
    every: int = 1,
    consistency: str = "noise",
    anchor_every: int = ANCHOR_EVERY,
    bank_size: int = 1,
    bank_every: int = 4,
    cfg_mode: str = "full",
    skip_similar: float | None = None,
    max_skip: int = 10,
    stream_batch: bool | None = None,
    size: tuple[int, int] | None = None,
    max_size: int | None = None,
    max_pixels: int | None = None,
    keep_size: bool = True,
    tiled: Tiled | None = None,
    context_frames: int = CONTEXT_FRAMES,
    context_overlap: int = CONTEXT_OVERLAP,
    events: Events | None = None,
    **overrides,
) -> BatchReport:
    """Stylise video files and folders into videos (or PNG frame folders); returns a BatchReport.

    `size`, `max_size` and `max_pixels` set the frames' working size (`Sizing`); outputs keep the
    input's size unless `keep_size` is False. With `tiled` frames run at full size over
    MultiDiffusion windows, one at a time (see the module docstring).
    """
    clip = Clip(start, end, max_frames, every, size, max_size, codec, crf, max_pixels, keep_size)
    clip = clip.check()
    if tiled is not None:
        tiled.check(Sizing(size, max_size, max_pixels))
        if tiled.upscale != 1.0:
            raise UsageError("video --tiled keeps the frames' size; --upscale is for stylize")
        if stream_batch:
            raise UsageError(
                "--tiled runs frames one at a time (the windows are the batch); drop --stream-batch"
            )
        if consistency in ("anchor", "bank"):
            raise UsageError(
                f"--consistency {consistency} has no --tiled (its attention features are one "
                "window's); use --consistency noise"
            )
        if cfg_mode in ("self", "initialize"):
            raise UsageError(f"--cfg-mode {cfg_mode} has no --tiled; use full")
    settings = resolve_settings(settings, preset, overrides)
    if settings.mode != "sample":
        raise UsageError(f"mode {settings.mode!r} is for images; videos are sampled (mode sample)")
    motion = None
    if settings.motion_adapter:
        refuse_with_motion(consistency, tiled, skip_similar, stream_batch)
        motion = MotionOptions(context_frames, context_overlap).check()
    output, events = with_seed(output or Output()), events or Events()
    frames_out = Path(frames_out) if frames_out is not None else None
    options = StreamOptions(
        steps=settings.steps,
        strength=settings.strength,
        consistency=consistency,
        anchor_every=anchor_every,
        bank_size=bank_size,
        bank_every=bank_every,
        cfg_mode=cfg_mode,
        skip_similar=skip_similar,
        max_skip=max_skip,
        stream_batch=stream_batch,
    ).check()
    jobs = plan_videos(inputs, output, frames_out)
    refuse_overwriting_files(jobs, style, "--style")
    check_encoding(jobs, clip, frames_out)
    runtime = runtime or Runtime()
    stages = settings.steps if stream_batch is not False else 1  # rows of one stream-batch call
    if motion is not None:
        stages = motion.context  # one window of frames per UNet call

    check_size = size_flag_check(settings, runtime, size, style, stages=stages)
    run = LazySession(
        settings,
        style,
        runtime=runtime,
        seed=output.seed,
        events=events,
        announce=size_notice(clip.sizing, "frames written") if tiled is None else tiled_notice,
        task="video",
        before=check_size,
        check=None if motion is None else lambda session: motion_fits(session, motion),
    )

    find_control, _ = control_image_finder(settings)

    def plan_size(job: Job) -> tuple[int, int] | None:
        """The frames' output size on --dry-run; a video the run would fail fails here too."""
        info = probe(job.input)
        select_frames(info, **clip.selection_args())
        if tiled is not None or clip.keep_size:
            return info.size
        if clip.size is not None:
            return clip.size
        native = planned_native_px(settings)
        return None if native is None else clip.working(info.size, native)

    def process(job: Job, seed: int) -> dict:
        info = probe(job.input)
        if tiled is None:
            width, height = clip.working(info.size, run().native_px)
            work = image_work(settings, (width, height), style, stages=stages)
            what = f"{job.input}: frames of {width}x{height}"
            run.check_input(work, what=what, hint="lower --max-pixels or --max-size")
        session = run()
        given = read_control_image(find_control(job), None) if find_control else None
        return stylize_one(
            job,
            seed,
            session,
            options,
            clip,
            frames_out=frames_out,
            events=events,
            info=info,
            tiled=tiled,
            given=given,
            motion=motion,
        )

    return run_jobs(
        jobs,
        output,
        process,
        prepare=run.prepare,
        check=run.before,
        plan_size=plan_size,
        events=events,
        write=lambda job, settings, output: settings,  # the video is written while it streams
    )


def tiled_notice(session) -> str:
    """What a tiled run tells the user once the model is loaded."""
    return (
        f"--tiled: frames run at full size over {session.native_px} px windows, one at a time "
        "(no stream batch; time grows with the frame's area)"
    )


# --- progress ----------------------------------------------------------------------------------


class VideoConsoleEvents(ConsoleEvents):
    """`ConsoleEvents` counting videos, with a per-video frames bar showing frames/s and an ETA."""

    def __init__(self, console, *, as_json: bool = False, quiet: bool = False, debug: bool = False):
        super().__init__(
            console, as_json=as_json, quiet=quiet, unit="videos", step_unit="frames", debug=debug
        )
