"""The `stylize` task: few-step image-to-image stylisation of files, folders and globs.

from stylekit.tasks.stylize import stylize
report = stylize(["photos/"], style=["ref.jpg"], preset="lcm-sd15", output=Output("styled/", seed=1))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from stylekit.control import ControlImage, control_image_finder, read_control_image
from stylekit.errors import UsageError
from stylekit.media.batch import BatchReport, Job, refuse_overwriting_files
from stylekit.media.images import (
    Sizing,
    SourceImage,
    finish,
    image_size,
    read_image,
    resized,
    with_alpha,
)
from stylekit.presets import Settings
from stylekit.runner import Events, Output, SayOnce, plan_files, run_batched
from stylekit.session import (
    LazySession,
    Runtime,
    default_batch,
    image_work,
    planned_native_px,
    resolve_settings,
    size_flag_check,
    size_notice,
    with_seed,
)


@dataclass(frozen=True)
class Tiled:
    """Full-resolution stylisation (`--tiled`): image-to-image over MultiDiffusion windows of the
    model's native size (the texture commands' windows, stride and view batch; None: their
    defaults) with the tiled VAE, on the input resampled by `upscale` (Lanczos) first."""

    upscale: float = 1.0
    window: int | None = None
    stride: int | None = None
    view_batch: int = 4

    def check(self, sizing: Sizing) -> Tiled:
        """Refuse bad values and the working-size flags, which --tiled replaces."""
        from stylekit.tasks.textures import check_window_options

        if not self.upscale > 0:
            raise UsageError(f"--upscale must be above 0, got {self.upscale}")
        if sizing != Sizing():
            raise UsageError(
                "--tiled runs at the input's own size (times --upscale); "
                "drop --size, --max-size, --max-pixels and --keep-size"
            )
        check_window_options(self.window, self.stride, self.view_batch, None)
        return self

    def target(self, size: tuple[int, int]) -> tuple[int, int]:
        """The output size of a (W, H) input: scaled by `upscale`, rounded."""
        width, height = (max(round(side * self.upscale), 8) for side in size)
        return width, height

    def working(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size the model runs at: the target rounded down to multiples of 8."""
        width, height = self.target(size)
        return width // 8 * 8, height // 8 * 8

    def plan(self, size: tuple[int, int], native: int):
        """The canvas plan (`tasks.textures.CanvasPlan`) of a working size."""
        from stylekit.tasks.textures import plan_canvas

        return plan_canvas(
            size, native=native, window=self.window, stride=self.stride, view_batch=self.view_batch
        )

    def settings(self, plan) -> dict:
        """What the output records beyond the session's metadata."""
        return {
            "tiled": True,
            "upscale": self.upscale,
            "window": plan.window,
            "stride": plan.stride,
            "view_batch": plan.view_batch,
            "windows": len(plan.windows()),
        }


@dataclass(frozen=True)
class Loaded:
    """An input read and brought to its working size."""

    source: SourceImage  # as read: its size and alpha are given back to the output
    image: Image.Image  # RGB at the working size
    control: ControlImage | None = None  # its `--control-image` map, at the working size

    def settings(self) -> dict:
        (w, h), (iw, ih) = self.image.size, self.source.size
        sizes = {"working_size": f"{w}x{h}", "input_size": f"{iw}x{ih}"}
        return sizes | (self.control.settings() if self.control else {})

    @property
    def given(self) -> Image.Image | None:
        """The precomputed control map, if any."""
        return self.control.image if self.control else None


def stylize(
    inputs: Sequence[str],
    *,
    style: Sequence[str] = (),
    settings: Settings | None = None,
    preset: str | None = None,
    output: Output | None = None,
    runtime: Runtime = Runtime(),
    size: tuple[int, int] | None = None,
    max_size: int | None = None,
    max_pixels: int | None = None,
    keep_size: bool = False,
    batch_size: int | None = None,
    tiled: Tiled | None = None,
    events: Events | None = None,
    **overrides,
) -> BatchReport:
    """Stylise image files, folders and globs; returns a BatchReport (see `stylekit.runner`).

    Each image runs at its working size (`media.images.Sizing`: by default scaled down to the
    model's native pixel budget, aspect kept) and is written at it, or at its own size with
    `keep_size`; an input's transparency is kept (PNG, WebP). Same-size images go through the
    UNet `batch_size` at a time; each keeps its own seed and comes out as it would alone.

    With `tiled` each image runs at its own size (times `tiled.upscale`) over MultiDiffusion
    windows with the tiled VAE, one image at a time, in memory bounded by the window batch.
    """
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    sizing = Sizing(size, max_size, max_pixels, keep_size).check()
    settings = resolve_settings(settings, preset, overrides)
    if tiled is not None:
        tiled.check(sizing)
        if batch_size is not None and batch_size > 1:
            raise UsageError(
                "--tiled runs one image at a time (its windows are the batch: --view-batch)"
            )
        if settings.mode == "optimize":
            raise UsageError("--tiled runs guided sampling; --mode optimize has no windows")
    output = with_seed(output or Output())
    jobs = plan_files(list(inputs), output)
    refuse_overwriting_files(jobs, style, "--style")
    find_control, control_files = control_image_finder(settings)
    refuse_overwriting_files(jobs, control_files, "--control-image")
    events = events or Events()
    say_once = SayOnce(events)
    batch = batch_size or default_batch(runtime)
    rows = min(batch, len(jobs)) or 1  # same-size images per UNet call, at most

    check_size = size_flag_check(settings, runtime, size, style, batch=rows)
    run = LazySession(
        settings,
        style,
        runtime=runtime,
        seed=output.seed,
        events=events,
        announce=size_notice(sizing) if tiled is None else tiled_notice,
        task="img2img",
        before=check_size,
    )

    def load(job: Job) -> Loaded:
        source = read_image(job.input)
        if tiled is not None:
            working = tiled.working(source.size)
        else:
            working = sizing.working(source.size, run().native_px)
            say_once("rounded", sizing.rounded(source.size, run().native_px))
            what = f"{job.input}: {working[0]}x{working[1]}"
            work = image_work(settings, working, style, batch=rows)
            run.check_input(work, what=what, hint="lower --max-pixels or --max-size")
        given = read_control_image(find_control(job), working) if find_control else None
        return Loaded(source, resized(source.rgb, working), given)

    def plan_size(job: Job) -> tuple[int, int] | None:
        """The output's size on --dry-run, from the input's header and the model's config."""
        own = image_size(job.input)
        if tiled is not None:
            return tiled.target(own)
        if sizing.keep_size:
            return own
        if sizing.size is not None:
            return sizing.size
        native = planned_native_px(settings)
        if native is None:
            return None
        say_once("rounded", sizing.rounded(own, native))
        return sizing.working(own, native)

    def process_tiled(batch: list[tuple[Job, int, Loaded]]):
        session = run()
        results = []
        for job, seed, item in batch:
            plan = tiled.plan(item.image.size, session.native)
            out = session.img2img_tiled(
                item.image, seed, plan, callback=events.step, given=item.given
            )
            out = with_alpha(resized(out, tiled.target(item.source.size)), item.source.alpha)
            meta = session.metadata(seed=seed, size=out.size, source=job.input.name)
            results.append((out, meta | item.settings() | tiled.settings(plan)))
        return results

    def process(batch: list[tuple[Job, int, Loaded]]):
        session = run()
        images, seeds = [b[2].image for b in batch], [b[1] for b in batch]
        given = [b[2].given for b in batch]
        outs = session.img2img(images, seeds, callback=events.step, given=given)
        results = []
        for out, (job, seed, item) in zip(outs, batch, strict=True):
            out = finish(out, item.source, keep_size=sizing.keep_size)
            meta = session.metadata(seed=seed, size=out.size, source=job.input.name)
            results.append((out, meta | item.settings()))
        return results

    return run_batched(
        jobs,
        output,
        load=load,
        process=process if tiled is None else process_tiled,
        batch_size=1 if tiled is not None else batch,
        key=lambda item: item.image.size,
        prepare=run.prepare,
        check=run.before,
        plan_size=plan_size,
        events=events,
    )


def tiled_notice(session) -> str:
    """What a tiled run tells the user once the model is loaded."""
    return (
        f"--tiled: images run at full size over {session.native_px} px windows "
        "(time grows with the image's area)"
    )
