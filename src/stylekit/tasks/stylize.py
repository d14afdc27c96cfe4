"""The `stylize` task: few-step image-to-image stylisation of files, folders and globs.

from stylekit.tasks.stylize import stylize
report = stylize(["photos/"], style=["ref.jpg"], preset="lcm-sd15", output=Output("styled/", seed=1))
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from stylekit.errors import UsageError
from stylekit.media.batch import BatchReport, Job, refuse_overwriting_files
from stylekit.media.images import load_image
from stylekit.presets import Settings
from stylekit.runner import Events, Output, plan_files, run_batched
from stylekit.session import (
    LazySession,
    Runtime,
    check_fits,
    default_batch,
    image_work,
    resolve_settings,
    with_seed,
)


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
    batch_size: int | None = None,
    events: Events | None = None,
    **overrides,
) -> BatchReport:
    """Stylise image files, folders and globs; returns a BatchReport (see `stylekit.runner`).

    Same-size images go through the UNet `batch_size` at a time; each keeps its own seed and
    comes out as it would alone.
    """
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    settings = resolve_settings(settings, preset, overrides)
    output = with_seed(output or Output())
    jobs = plan_files(list(inputs), output)
    refuse_overwriting_files(jobs, style, "--style")
    events = events or Events()
    batch = batch_size or default_batch(runtime)
    rows = min(batch, len(jobs)) or 1  # same-size images per UNet call, at most

    def check_size() -> None:  # before the model loads: --size is every image's size
        if size is not None:
            work = image_work(settings, size, style, batch=rows)
            what = f"--size {size[0]}x{size[1]}"
            check_fits(settings, runtime, work, what=what, hint="choose a smaller --size")

    run = LazySession(
        settings, style, runtime=runtime, seed=output.seed, events=events, before=check_size
    )

    def load(job: Job) -> Image.Image:
        image = load_image(job.input, size=size, max_size=max_size)
        what = f"{job.input}: {image.width}x{image.height}"
        work = image_work(settings, image.size, style, batch=rows)
        run.check_input(work, what=what, hint="shrink it with --max-size")
        return image

    def process(batch: list[tuple[Job, int, Image.Image]]):
        session = run()
        images, seeds = [b[2] for b in batch], [b[1] for b in batch]
        outs = session.img2img(images, seeds, callback=events.step)
        return [
            (out, session.metadata(seed=seed, size=im.size, source=job.input.name))
            for out, (job, seed, im) in zip(outs, batch, strict=True)
        ]

    return run_batched(
        jobs,
        output,
        load=load,
        process=process,
        batch_size=batch,
        key=lambda im: im.size,
        prepare=run.prepare,
        events=events,
    )
