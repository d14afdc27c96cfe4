"""The `t2i-styled` task: AD-guided few-step text-to-image in the style of reference images.

from stylekit.tasks.t2i import t2i_styled
report = t2i_styled("a lighthouse", style=["ref.jpg"], count=4, output=Output(seed=1))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stylekit.control import ControlImage, map_only_controls, read_control_image
from stylekit.errors import InputError, UsageError
from stylekit.media.batch import (
    DEFAULT_OUT_DIR,
    FORMAT_EXTS,
    IMAGE_EXTS,
    BatchReport,
    Job,
    check_file_format,
    output_format,
    refuse_overwriting_files,
)
from stylekit.presets import COMMAND_DEFAULTS, Settings
from stylekit.runner import Events, Output, run_jobs
from stylekit.session import (
    LazySession,
    Runtime,
    planned_native_px,
    resolve_settings,
    size_flag_check,
    with_seed,
)


def prompt_stem(prompt: str, limit: int = 40) -> str:
    """A file-name stem from a prompt: lowercase words joined by '-', at most `limit` chars."""
    words = "".join(c if c.isalnum() else " " for c in prompt.lower()).split()
    return "-".join(words)[:limit].strip("-") or "image"


def plan_generated(count: int, prompt: str, output: Output) -> list[Job]:
    """Jobs for generated images (no input file): `<prompt-stem>-NNN.<fmt>` or exactly `-o FILE`."""
    if count < 1:
        raise UsageError(f"-n must be at least 1, got {count}")
    out = Path(output.out) if output.out is not None else DEFAULT_OUT_DIR
    if out.suffix.lower() in IMAGE_EXTS and not out.is_dir():
        if count != 1:
            raise UsageError(f"-o {out} names one file but -n is {count}")
        check_file_format(out, output.fmt)
        return [Job(None, out, Path(out.name), 0)]
    ext = FORMAT_EXTS[output_format(output.fmt)]
    stem = prompt_stem(prompt) + output.suffix
    return [
        Job(None, out / f"{stem}-{i:03d}{ext}", Path(f"{stem}-{i:03d}{ext}"), i)
        for i in range(count)
    ]


def t2i_styled(
    prompt: str,
    *,
    style: Sequence[str] = (),
    count: int = 1,
    settings: Settings | None = None,
    preset: str | None = None,
    output: Output | None = None,
    runtime: Runtime = Runtime(),
    size: tuple[int, int] | None = None,
    events: Events | None = None,
    **overrides,
) -> BatchReport:
    """AD-guided few-step text-to-image from pure noise, `size` = (W, H) or the model's native."""
    for key, value in COMMAND_DEFAULTS["t2i-styled"].items():  # style_mode ad: the point of it
        if overrides.get(key) is None:
            overrides[key] = value
    settings = resolve_settings(settings, preset, {**overrides, "prompt": prompt})
    output = with_seed(output or Output())
    jobs = plan_generated(count, prompt, output)
    refuse_overwriting_files(jobs, style, "--style")
    events = events or Events()

    given = generation_control(settings)
    if given is not None and size is None:  # the map's own size, as diffusers' pipelines take it
        size = (given.image.width // 8 * 8, given.image.height // 8 * 8)
    if given is not None:
        refuse_overwriting_files(jobs, [settings.control_image], "--control-image")
    check_size = size_flag_check(settings, runtime, size, style)
    run = LazySession(
        settings,
        style,
        runtime=runtime,
        seed=output.seed,
        events=events,
        task="noise",
        before=check_size,
    )

    def process(job: Job, seed: int):
        session = run()
        width, height = size or (session.native * 8, session.native * 8)
        control = given.at((width, height)) if given else None  # the map read once per run
        image = session.generate(
            width, height, seed=seed, callback=events.step, given=control and control.image
        )
        meta = session.metadata(seed=seed, size=(width, height))
        return image, meta | (control.settings() if control else {})

    def plan_size(job: Job) -> tuple[int, int] | None:
        """The image's size on --dry-run: `size`, or the native size from the model's config."""
        native = planned_native_px(settings) if size is None else None
        return size or (native and (native, native))

    return run_jobs(
        jobs,
        output,
        process,
        prepare=run.prepare,
        check=run.before,
        plan_size=plan_size,
        events=events,
    )


def generation_control(settings: Settings) -> ControlImage | None:
    """The control map of a generation from a prompt, at its own size (`map_only_controls`);
    read now: a missing map stops the run (exit 2)."""
    if not map_only_controls(settings, "t2i-styled"):
        return None
    path = Path(settings.control_image)
    if not path.is_file():
        raise UsageError(f"--control-image {path}: no such file (t2i-styled takes one map file)")
    try:
        return read_control_image(path, None)
    except InputError as exc:
        raise UsageError(f"--control-image {exc}") from exc
