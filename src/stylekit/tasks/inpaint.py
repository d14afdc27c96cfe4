"""The `inpaint` task: repaint the white part of a mask in every input, keep every other pixel.

    from stylekit.tasks.inpaint import inpaint
    report = inpaint(["photos/"], mask="masks/", preset="lcm-sd15", prompt="a red door", seed=1)

`mask` is one image used for every input or a folder of masks matched to the inputs by file stem
(`photos/x/a.jpg` takes `masks/x/a.*`, else `masks/a.*`). White (≥ 50 % grey) is repainted; any
image mode works, transparency counts as white. A mask of another size is resized (nearest) to
its image and the output's settings say so (`mask_resized_from`). The model and the prompt/style
conditioning load once per batch (`session.LazySession`). The `stylekit inpaint` command is in cli.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps

from stylekit.engine import inpaint as engine
from stylekit.errors import InputError, UsageError
from stylekit.media.batch import BatchReport, Job, collect_inputs, refuse_overwriting_files
from stylekit.media.images import load_image, open_rgb
from stylekit.presets import Settings
from stylekit.runner import Events, Output, plan_files, run_jobs
from stylekit.session import (
    LazySession,
    Runtime,
    Session,
    check_fits,
    image_work,
    resolve_settings,
    with_seed,
)

DEFAULT_MASK_BLUR = 4  # px of feathering outside the mask: hides the seam, touches little else
MAX_MASK_BLUR = 64


def check_mask_blur(blur: int) -> int:
    """Refuse a feather width that is not a whole number of pixels in 0..MAX_MASK_BLUR."""
    if isinstance(blur, bool) or not isinstance(blur, int) or not 0 <= blur <= MAX_MASK_BLUR:
        raise UsageError(
            f"--mask-blur must be a whole number of px in 0..{MAX_MASK_BLUR}, got {blur!r}"
        )
    return blur


def mask_finder(mask: str | Path) -> tuple[Callable[[Job], Path], set[Path]]:
    """Return (job → its mask file, every mask file) for a mask file or a folder of masks."""
    path = Path(mask).expanduser()
    if path.is_file():
        return (lambda job: path), {path.resolve()}
    if not path.is_dir():
        raise UsageError(f"--mask {mask}: no such file or folder")
    try:
        items = collect_inputs([str(path)])
    except UsageError as exc:
        raise UsageError(f"--mask {mask}: folder holds no mask images") from exc
    by_rel: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for item in items:
        by_rel.setdefault(item.rel.with_suffix("").as_posix(), []).append(item.path)
        by_stem.setdefault(item.rel.stem, []).append(item.path)

    def find(job: Job) -> Path:
        found = by_rel.get(job.rel.with_suffix("").as_posix()) or by_stem.get(job.rel.stem, [])
        if not found:
            raise InputError(f"{job.input}: no mask named {job.rel.stem}.* in {path}")
        if len(found) > 1:
            names = ", ".join(str(p) for p in found)
            raise InputError(f"{job.input}: more than one mask matches ({names})")
        return found[0]

    return find, {item.path.resolve() for item in items}


def load_mask(path: Path, size: tuple[int, int], *, invert: bool) -> tuple[Image.Image, str | None]:
    """Read a mask as grey ("L") at `size`; returns (mask, its original size if it was resized)."""
    grey = open_rgb(path).convert("L")  # transparent parts were composited on white
    resized = None
    if grey.size != size:
        resized = f"{grey.size[0]}x{grey.size[1]}"
        grey = grey.resize(size, Image.Resampling.NEAREST)
    return (ImageOps.invert(grey) if invert else grey), resized


def refuse_ad_on_9ch(session: Session) -> None:
    """AD guidance needs a plain UNet: an inpainting UNet's inputs are not what AD records."""
    if session.references is not None and session.model.inpainting_unet:
        raise UsageError(
            "--style-mode ad/both needs a plain (4-channel) model, not an inpainting UNet"
        )


def inpaint(
    inputs: Sequence[str],
    *,
    mask: str | Path,
    style: Sequence[str] = (),
    settings: Settings | None = None,
    preset: str | None = None,
    output: Output | None = None,
    runtime: Runtime | None = None,
    size: tuple[int, int] | None = None,
    max_size: int | None = None,
    invert_mask: bool = False,
    mask_blur: int = DEFAULT_MASK_BLUR,
    events: Events | None = None,
    **overrides,
) -> BatchReport:
    """Repaint the masked part of image files, folders and globs; returns a BatchReport.

    Each output equals its input outside the mask grown by `mask_blur` px, byte for byte; inside,
    it is the model's image (diffusers' inpaint pipeline result), feathered over `mask_blur` px.
    An input without a mask fails alone; the batch goes on and the exit code says so.
    """
    settings = resolve_settings(settings, preset, overrides)
    if settings.mode != "sample":
        raise UsageError("inpaint samples in few steps; --mode optimize is not available here")
    output = with_seed(output or Output())
    check_mask_blur(mask_blur)
    find_mask, mask_files = mask_finder(mask)
    jobs = [
        job for job in plan_files(list(inputs), output) if job.input.resolve() not in mask_files
    ]
    if not jobs:
        raise UsageError("every input is one of the masks; put the masks in another folder")
    refuse_overwriting_files(jobs, style, "--style")
    refuse_overwriting_files(jobs, mask_files, "--mask")
    events = events or Events()
    runtime = runtime or Runtime()

    def check_size() -> None:  # before the model loads: --size is every image's size
        if size is not None:
            what = f"--size {size[0]}x{size[1]}"
            work = image_work(settings, size, style)
            check_fits(settings, runtime, work, what=what, hint="choose a smaller --size")

    run = LazySession(
        settings,
        style,
        runtime=runtime,
        seed=output.seed,
        events=events,
        check=refuse_ad_on_9ch,
        before=check_size,
    )

    def process(job: Job, seed: int):
        image = load_image(job.input, size=size, max_size=max_size)
        what = f"{job.input}: {image.width}x{image.height}"
        work = image_work(settings, image.size, style)
        run.check_input(work, what=what, hint="shrink it with --max-size")
        mask_path = find_mask(job)
        grey, resized = load_mask(mask_path, image.size, invert=invert_mask)
        out = repaint(run(), image, grey, seed=seed, blur=mask_blur, callback=events.step)
        meta = run().metadata(seed=seed, size=image.size, source=job.input.name)
        meta |= {
            "mask": mask_path.name,
            "mask_blur": mask_blur,
            "invert_mask": invert_mask,
            "mask_resized_from": resized,
        }
        return out, meta

    return run_jobs(jobs, output, process, prepare=run.prepare, events=events)


def repaint(
    session: Session,
    image: Image.Image,
    mask: Image.Image,
    *,
    seed: int,
    blur: int,
    callback: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Inpaint one image with a loaded session's model and conditioning, then paste the rest back."""
    binary = engine.binarize(mask)
    if not binary.any():
        raise InputError(
            "the mask has no white pixels, so nothing would be repainted (--invert-mask?)"
        )
    s = session.settings
    arr = engine.inpaint(
        session.model,
        session.cond,
        session.sampler,
        image,
        binary,
        steps=s.steps,
        strength=s.strength,
        generator=torch.Generator("cpu").manual_seed(seed),
        guidance=session.guided,
        callback=callback,
    )
    return engine.paste_back(image, arr, engine.feather(binary, blur))
