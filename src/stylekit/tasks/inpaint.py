"""The `inpaint` task: repaint the white part of a mask in every input, keep every other pixel.

    from stylekit.tasks.inpaint import inpaint
    report = inpaint(["photos/"], mask="masks/", preset="lcm-sd15", prompt="a red door", seed=1)

`mask` is one image used for every input or a folder of masks matched to the inputs by file stem
(`photos/x/a.jpg` takes `masks/x/a.*`, else `masks/a.*`). White (≥ 50 % grey) is repainted; any
image mode works, transparency counts as white. A mask of another size is resized (nearest) to
its image and the output's settings say so (`mask_resized_from`). The model and the prompt/style
conditioning load once per batch (`session.LazySession`). The `stylekit inpaint` command is in cli.py.

Only the mask's neighbourhood runs through the model, whatever the input's size (A1111's "only
masked"): the bounding box of the feathered mask grown by `mask_padding` px of context is cropped,
scaled to fill the working size (`Sizing`, fill: the model's native pixel budget by default, up or
down, aspect kept; `size` also widens the box to its aspect ratio), repainted, scaled back and
pasted into the input at full resolution. The output has the input's exact size, and every pixel
outside the mask grown by `mask_blur` px is the input's, byte for byte; so is its alpha channel.

With `tiled` (`--tiled`) the crop is not scaled: its box is widened to multiples of 8 px where
the image has room (else the crop is resampled to the multiple of 8 below) and it runs at that size over MultiDiffusion windows of the model's native size with the tiled VAE
(`engine.inpaint.inpaint(windows=)`), in memory bounded by the window batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from stylekit.control import control_image_finder, read_control_image
from stylekit.engine import inpaint as engine
from stylekit.engine import models
from stylekit.engine.latents import to_pil
from stylekit.errors import InputError, StylekitError, UsageError
from stylekit.media.batch import (
    BatchReport,
    Job,
    refuse_overwriting_files,
    stem_finder,
)
from stylekit.media.images import Sizing, image_size, open_rgb, read_image, resized, with_alpha
from stylekit.presets import Settings
from stylekit.runner import Events, Output, plan_files, run_jobs
from stylekit.session import (
    LazySession,
    Runtime,
    Session,
    image_work,
    resolve_settings,
    size_flag_check,
    uses_ad,
    with_seed,
)
from stylekit.tasks.stylize import Tiled

DEFAULT_MASK_BLUR = 4  # px of feathering outside the mask: hides the seam, touches little else
MAX_MASK_BLUR = 64
DEFAULT_MASK_PADDING = 32  # px of context around the mask's box, A1111's "only masked" default


def check_mask_blur(blur: int) -> int:
    """Refuse a feather width that is not a whole number of pixels in 0..MAX_MASK_BLUR."""
    if isinstance(blur, bool) or not isinstance(blur, int) or not 0 <= blur <= MAX_MASK_BLUR:
        raise UsageError(
            f"--mask-blur must be a whole number of px in 0..{MAX_MASK_BLUR}, got {blur!r}"
        )
    return blur


def check_mask_padding(padding: int) -> int:
    """Refuse a context padding that is not a whole number of pixels ≥ 0."""
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise UsageError(f"--mask-padding must be a whole number of px ≥ 0, got {padding!r}")
    return padding


def load_mask(path: Path, size: tuple[int, int], *, invert: bool) -> tuple[Image.Image, str | None]:
    """Read a mask as grey ("L") at `size`; returns (mask, its original size if it was resized)."""
    grey = open_rgb(path).convert("L")  # transparent parts were composited on white
    resized = None
    if grey.size != size:
        resized = f"{grey.size[0]}x{grey.size[1]}"
        grey = grey.resize(size, Image.Resampling.NEAREST)
    return (ImageOps.invert(grey) if invert else grey), resized


AD_ON_9CH = "--style-mode ad/both needs a plain (4-channel) model, not an inpainting UNet"


def refuse_ad_on_9ch(session: Session) -> None:
    """AD guidance needs a plain UNet: an inpainting UNet's inputs are not what AD records."""
    if session.references is not None and session.model.inpainting_unet:
        raise UsageError(AD_ON_9CH)


def refuse_ad_on_9ch_config(settings: Settings, style: Sequence[str]) -> None:
    """`refuse_ad_on_9ch` before the model loads (on --dry-run too), where its UNet config can
    be read (a diffusers folder, or a hub id in the cache); the loaded model is checked anyway."""
    if not uses_ad(settings, style):
        return
    try:
        unet, _ = models.read_configs(settings.model)
    except StylekitError:
        return
    if unet is not None and unet.get("in_channels") == 9:
        raise UsageError(AD_ON_9CH)


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
    max_pixels: int | None = None,
    invert_mask: bool = False,
    mask_blur: int = DEFAULT_MASK_BLUR,
    mask_padding: int = DEFAULT_MASK_PADDING,
    tiled: Tiled | None = None,
    events: Events | None = None,
    **overrides,
) -> BatchReport:
    """Repaint the masked part of image files, folders and globs; returns a BatchReport.

    Each output has its input's size and equals it outside the mask grown by `mask_blur` px, byte
    for byte; inside, it is the model's image (diffusers' inpaint pipeline result on the crop, see
    the module docstring), feathered over `mask_blur` px. `size`, `max_size` and `max_pixels` set
    the crop's working size (`Sizing`). An input without a mask fails alone; the batch goes on and
    the exit code says so. With `tiled` the crop runs at full size over MultiDiffusion windows
    (see the module docstring); the working-size flags are refused then.
    """
    sizing = Sizing(size, max_size, max_pixels).check()
    if tiled is not None:
        tiled.check(sizing)
        if tiled.upscale != 1.0:
            raise UsageError("inpaint --tiled keeps the input's size; --upscale is for stylize")
    settings = resolve_settings(settings, preset, overrides)
    if settings.mode != "sample":
        raise UsageError("inpaint samples in few steps; --mode optimize is not available here")
    output = with_seed(output or Output())
    check_mask_blur(mask_blur)
    check_mask_padding(mask_padding)
    find_mask, mask_files = stem_finder(mask, flag="--mask", what="mask")
    jobs = [
        job
        for job in plan_files(list(inputs), output)
        if Path(os.path.realpath(job.input)) not in mask_files
    ]
    if not jobs:
        raise UsageError("every input is one of the masks; put the masks in another folder")
    refuse_overwriting_files(jobs, style, "--style")
    refuse_overwriting_files(jobs, mask_files, "--mask")
    find_control, control_files = control_image_finder(settings)
    refuse_overwriting_files(jobs, control_files, "--control-image")
    events = events or Events()
    runtime = runtime or Runtime()

    check_size = size_flag_check(settings, runtime, size, style)
    run = LazySession(
        settings,
        style,
        runtime=runtime,
        seed=output.seed,
        events=events,
        check=refuse_ad_on_9ch,
        task="img2img",
        announce=lambda session: (
            f"working size: the mask's box plus {mask_padding} px of context, "
            + (
                f"at full size over {session.native_px} px windows (--tiled)"
                if tiled is not None
                else sizing.describe(session.native_px, fill=True)
            )
            + "; outputs keep the input's size"
        ),
        before=check_size,
    )

    def process(job: Job, seed: int):
        source = read_image(job.input)

        def fits(working: tuple[int, int]) -> None:  # the crop at its working size
            what = f"{job.input}: the mask's crop at {working[0]}x{working[1]}"
            work = image_work(settings, working, style)
            run.check_input(work, what=what, hint="lower --max-pixels or --max-size")

        mask_path = find_mask(job)
        grey, mask_resized = load_mask(mask_path, source.size, invert=invert_mask)
        given = read_control_image(find_control(job), source.size) if find_control else None
        out, crop = repaint(
            run(),
            source.rgb,
            grey,
            seed=seed,
            blur=mask_blur,
            padding=mask_padding,
            sizing=sizing,
            callback=events.step,
            fits=None if tiled is not None else fits,
            tiled=tiled,
            given=given.image if given else None,
        )
        meta = run().metadata(seed=seed, size=out.size, source=job.input.name)
        meta |= given.settings() if given else {}
        meta |= crop | {
            "mask": mask_path.name,
            "mask_blur": mask_blur,
            "mask_padding": mask_padding,
            "invert_mask": invert_mask,
            "mask_resized_from": mask_resized,
        }
        return with_alpha(out, source.alpha), meta

    def check() -> None:
        """What the run refuses before the model loads (on --dry-run too)."""
        check_size()
        refuse_ad_on_9ch_config(settings, style)

    def plan_size(job: Job) -> tuple[int, int]:
        """The output's size on --dry-run: the input's; an input without its mask fails."""
        find_mask(job)
        return image_size(job.input)

    return run_jobs(
        jobs,
        output,
        process,
        prepare=run.prepare,
        check=check,
        plan_size=plan_size,
        events=events,
    )


def repaint(
    session: Session,
    image: Image.Image,
    mask: Image.Image,
    *,
    seed: int,
    blur: int = DEFAULT_MASK_BLUR,
    padding: int = DEFAULT_MASK_PADDING,
    sizing: Sizing = Sizing(),
    callback: Callable[[int, int], None] | None = None,
    fits: Callable[[tuple[int, int]], None] | None = None,
    tiled: Tiled | None = None,
    given: Image.Image | None = None,
) -> tuple[Image.Image, dict]:
    """Inpaint one image with a loaded session's model and conditioning; (output, crop settings).

    The crop around the mask runs at its working size (`fits(size)` may refuse it first), or
    with `tiled` at its own size over MultiDiffusion windows; the output is `image` with the
    repainted pixels pasted back at full resolution (see the module docstring). The session's
    controls read the crop's maps: computed from it, or cropped from `given` (a precomputed map
    at the image's size).
    """
    binary = engine.binarize(mask)
    if not binary.any():
        raise InputError(
            "the mask has no white pixels, so nothing would be repainted (--invert-mask?)"
        )
    weights = engine.feather(binary, blur)  # (H, W), 0 wherever the input is kept
    box = engine.crop_box(weights > 0, padding, aspect=sizing.size)
    if tiled is not None:  # full size: no resampling where the image leaves room for it
        box = engine.snap_box(box, image.size)
    left, top, right, bottom = box
    crop = image.crop(box)
    windows, extra = None, {}
    if tiled is not None:
        from stylekit.engine.windows import Windows

        working = tiled.working(crop.size)
        plan = tiled.plan(working, session.native)
        windows = Windows.of(plan)
        extra = tiled.settings(plan)
        del extra["upscale"]
    else:
        working = sizing.working(crop.size, session.native_px, fill=True)
    if fits is not None:
        fits(working)
    hole = working_mask(binary[0, 0, top:bottom, left:right].numpy(), working)
    s = session.settings
    content = resized(crop, working)
    given_crop = resized(given.crop(box), working) if given is not None else None
    arr = engine.inpaint(
        session.model,
        session.cond,
        session.sampler,
        content,
        hole,
        steps=s.steps,
        strength=s.strength,
        generator=torch.Generator("cpu").manual_seed(seed),
        guidance=session.guided,
        callback=callback,
        windows=windows,
        control=session.control_of([content], [given_crop]),
    )
    if working != crop.size:
        arr = np.asarray(resized(to_pil(arr), crop.size), dtype=np.float32) / 255.0
    out = image.copy()
    out.paste(engine.paste_back(crop, arr, weights[top:bottom, left:right]), box[:2])
    (w, h), (cw, ch) = working, crop.size
    return out, {"working_size": f"{w}x{h}", "crop": f"{cw}x{ch}+{left}+{top}"} | extra


def working_mask(hole: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A 0/1 (H, W) crop of the mask at the working `size` as (1, 1, h, w): a working pixel is
    repainted if any input pixel under it is (a thin stroke survives scaling down)."""
    if hole.shape[::-1] != tuple(size):
        grey = Image.fromarray(hole.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)
        hole = np.asarray(grey) > 0
    return torch.from_numpy(hole.astype(np.float32))[None, None]
