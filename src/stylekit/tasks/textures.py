"""Textures of any size from an exemplar: MultiDiffusion over the few-step UNet with AD guidance.

    from stylekit.tasks.textures import texture_expand
    report = texture_expand(["brick.png"], size=(1536, 512), preset="lcm-sd15", seed=1)

`texture_expand` samples a canvas of any size (multiples of 8 px) from pure noise: MultiDiffusion
(Bar-Tal et al. 2023, docs/multidiffusion.md) predicts ε on windows of the canvas and averages them
(an ε-prediction hook of the one sampling loop), and after every step each window of the canvas is
refined by attention distillation against the whole exemplar and the refined windows averaged (AD,
arXiv 2502.20235; reference features cached per timestep). The latent is decoded tile by tile (`tiling.decode_tiled`), so
memory grows with the canvas, not with the model's activations; time grows with the windows.

`texture` is synthesis at the exemplar's scale: the canvas defaults to the exemplar's size, AD's
guided-sampling defaults apply (3 iterations), label maps steer which part of the exemplar goes
where (`source_mask`/`target_mask`: equal colours are the same label), and `mode="optimize"` runs
AD's optimisation from noise instead (300 timesteps, no content term). It is the same code path
as `texture_expand` with other defaults, so a canvas larger than a window is tiled the same way.

Choices, with their reasons:

- Texture defaults (style mode ad, CFG 1, empty prompt, AD lr 0.05, AdaIN on; iterations 2 for
  expansion, 3 for synthesis; 300 optimisation steps) are the AD release's texture settings.
  They replace the preset's (or `settings`') values for these keys, since a preset's CFG 6 and
  IP-Adapter style mode are image-to-image choices; explicit options replace them in turn.
  Style modes: ad, or none (AD off).
- Window (latents): the UNet's native latent size (64 for SD1.5, 128 for SDXL), clamped to the
  canvas. Stride: half the window, so every latent lies in about 4 windows (2 per axis), enough to
  blend the window borders away; the panorama pipeline's stride 8 costs 16 times the UNet calls at
  window 64. Windows: ((H - w) / s + 1)((W - w) / s + 1) per step, rounded up.
- View batch 4: windows per UNet call; small enough for a CPU, cheap to raise on a GPU.
- Seamless ("x", "y", "xy"): windows wrap around the canvas along those axes and the VAE pads
  circularly there; the UNet pads circularly only along a wrapped axis that fits in one window
  (a longer axis is made periodic by the wrapped windows themselves, and a crop is not periodic).
- Exemplars larger than the model's native size (512 px SD1.5, 1024 px SDXL) are shrunk to it
  (unless `max_size` says otherwise): AD's reference features are computed on the whole exemplar.
- Label masks (controlled synthesis) work at any canvas size: each window is refined with its
  own crop of the target map (the source map stays whole, like the exemplar), one window per
  refinement call; AdaIN matches each label's region to the same label's region of the exemplar.
- The reference noise of AD guidance is drawn from its own stream derived from the job's seed
  (`session.reference_generator`), not the seed itself: with equal shapes the canvas noise would
  otherwise equal the reference noise and pull the canvas towards a copy of the exemplar's layout.

Same batch contract as `stylize`: outputs `<exemplar-stem><suffix>.<fmt>` under `-o` (default
./stylized/), existing outputs skipped, atomic writes, settings in the file, a bad exemplar fails
alone (exit 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from stylekit.control import control_image_finder, map_only_controls, read_control_image
from stylekit.engine import ad, memory
from stylekit.engine.ad_loss import LabelMaps
from stylekit.engine.controlnet import Control
from stylekit.engine.models import LoadedModel
from stylekit.engine.predict import multidiffusion, noise_predictor
from stylekit.engine.sampling import sample
from stylekit.engine.tiling import circular_padding, decode_tiled, views
from stylekit.engine.txt2img import schedule
from stylekit.engine.windows import Windows
from stylekit.errors import InputError, UsageError
from stylekit.media.batch import BatchReport, Job, refuse_overwriting_files
from stylekit.media.images import fitted_size, image_size, load_image, open_rgb
from stylekit.presets import COMMAND_DEFAULTS, Settings
from stylekit.runner import Events, Output, SayOnce, plan_files, run_jobs
from stylekit.session import (
    Runtime,
    Session,
    announce,
    cfg_rows,
    check_fits,
    check_sources,
    open_session,
    planned_native_px,
    resolve_settings,
    with_seed,
)

SEAMLESS = {"none": (False, False), "x": (True, False), "y": (False, True), "xy": (True, True)}
DEFAULT_VIEW_BATCH = 4  # windows per UNet call: small for CPUs, raise it on a GPU
DECODE_TILE, DECODE_OVERLAP = 64, 16  # latents: 512 px tiles with 128 px of context
STYLE_MODES = ("ad", "none")
# The AD release's texture settings (empty prompt, CFG 1, lr 0.05, AdaIN); see the module docstring.
EXPAND_DEFAULTS = COMMAND_DEFAULTS["texture-expand"]
TEXTURE_DEFAULTS = COMMAND_DEFAULTS["texture"]


# --- the canvas plan ---------------------------------------------------------------------------


def seamless_axes(seamless: str | None) -> tuple[bool, bool]:
    """(wrap x, wrap y) for a seamless mode: None/"none", "x", "y" or "xy"."""
    if seamless not in (None, *SEAMLESS):
        raise UsageError(f"--seamless {seamless!r}; choose one of {', '.join(SEAMLESS)}")
    return SEAMLESS[seamless or "none"]


def check_window_options(
    window: int | None, stride: int | None, view_batch: int, seamless: str | None
) -> None:
    """Refuse bad window options before any model loads (the native window needs the model)."""
    if window is not None and window < 1:
        raise UsageError(f"--window must be at least 1 latent, got {window}")
    if stride is not None and stride < 1:
        raise UsageError(f"--stride must be at least 1 latent, got {stride}")
    if stride is not None and window is not None and stride > window:
        raise UsageError(f"--stride {stride} is larger than --window {window}")
    if view_batch < 1:
        raise UsageError(f"--view-batch must be at least 1, got {view_batch}")
    seamless_axes(seamless)


@dataclass(frozen=True)
class CanvasPlan:
    """How one canvas is sampled: its latent size, MultiDiffusion windows, wrapping; all in latents."""

    height: int
    width: int
    window: int
    stride: int
    view_batch: int
    seamless: str  # none | x | y | xy

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) in pixels."""
        return self.width * 8, self.height * 8

    @property
    def wrap(self) -> tuple[bool, bool]:
        """(x, y): the axes whose windows wrap around and whose VAE padding is circular."""
        return SEAMLESS[self.seamless]

    @property
    def unet_wrap(self) -> tuple[bool, bool]:
        """(x, y): circular UNet padding, only along a wrapped axis that fits in one window."""
        wrap_x, wrap_y = self.wrap
        return wrap_x and self.width <= self.window, wrap_y and self.height <= self.window

    def windows(self) -> list:
        """The MultiDiffusion windows (`tiling.View`), row-major."""
        wrap_x, wrap_y = self.wrap
        return views(
            self.height,
            self.width,
            window=self.window,
            stride=self.stride,
            wrap_x=wrap_x,
            wrap_y=wrap_y,
        )

    def decode_tiles(self) -> int:
        """How many tiles `decode_tiled` decodes (each ≤ (tile + 2 overlap)² latents)."""
        return math.ceil(self.height / DECODE_TILE) * math.ceil(self.width / DECODE_TILE)


def plan_canvas(
    size: tuple[int, int],
    *,
    native: int,
    window: int | None = None,
    stride: int | None = None,
    view_batch: int = DEFAULT_VIEW_BATCH,
    seamless: str | None = None,
) -> CanvasPlan:
    """Plan a (W, H) px canvas: window defaults to `native` latents, stride to half the window.

    A stride larger than the window is refused. Both are then clamped to the canvas's longer
    latent side: along an axis no longer than the window the canvas is one window.
    """
    width, height = size
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise UsageError(f"size {width}x{height}: width and height must be multiples of 8")
    check_window_options(window, stride, view_batch, seamless)
    h, w = height // 8, width // 8
    window = native if window is None else window
    if stride is not None and stride > window:
        raise UsageError(f"--stride {stride} is larger than the window ({window} latents)")
    window = min(window, max(h, w))
    stride = max(window // 2, 1) if stride is None else min(stride, window)
    return CanvasPlan(h, w, window, stride, view_batch, seamless or "none")


# --- the engine: one canvas --------------------------------------------------------------------


def initial_noise(session: Session, plan: CanvasPlan, generator: torch.Generator) -> torch.Tensor:
    """The canvas's starting noise (1, C, h, w), drawn like diffusers' pipelines draw it."""
    m = session.model
    shape = (1, m.unet.config.in_channels, plan.height, plan.width)
    return randn_tensor(shape, generator=generator, device=m.device, dtype=m.dtype)


def sample_canvas(
    session: Session,
    plan: CanvasPlan,
    z: torch.Tensor,
    *,
    generator: torch.Generator,
    callback: Callable[[int, int], None] | None = None,
    control: Control | None = None,
) -> torch.Tensor:
    """MultiDiffusion from noise `z`: the one sampling loop with window-averaged ε and, when the
    session has references, AD refinement of every window after every step. With `control`
    (ControlNets with their maps at the canvas's size) each window reads its crop of the maps.

    The reference features are computed before the UNet's padding turns circular (the exemplar
    does not tile); `callback(done, total)` counts windows over all steps.
    """
    ts, windows = schedule(session.model, session.settings.steps), plan.windows()
    first = windows[0]
    eps = noise_predictor(session.model, session.cond, 8 * first.height, 8 * first.width)
    if control is not None:  # the windows' crops of the maps: `Windows`' predictor
        control = control.scheduled(ts)
        eps = Windows(windows, view_batch=plan.view_batch).predictor(
            session.model, session.cond, callback=callback, steps=len(ts), control=control
        )
    after = None
    refs, ac = session.references, session.sampler.ac
    if refs is not None:
        for i in range(len(ts)):
            ad.noised_features(session.model, refs, session.features, ad.next_timestep(ts, i), ac)
        after = ad.windowed_guidance(
            session.model,
            refs,
            session.features,
            ts,
            ac,
            windows,
            view_batch=plan.view_batch,
            control=control,
        )
    unet_x, unet_y = plan.unet_wrap
    wrap_x, wrap_y = plan.wrap
    with circular_padding(session.model.unet, x=unet_x, y=unet_y):
        if control is not None:  # eps is window-averaged already
            with torch.no_grad():
                return sample(eps, z, ts, session.sampler, generator=generator, after_step=after)
        return multidiffusion(
            eps,
            z,
            ts,
            session.sampler,
            window=plan.window,
            stride=plan.stride,
            view_batch=plan.view_batch,
            generator=generator,
            wrap_x=wrap_x,
            wrap_y=wrap_y,
            after_step=after,
            callback=callback,
        )


def optimize_canvas(
    session: Session,
    plan: CanvasPlan,
    z: torch.Tensor,
    *,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """AD's optimisation-based synthesis from noise `z`, on the whole canvas at once (no windows)."""
    wrap_x, wrap_y = plan.wrap  # the canvas is one piece: the UNet wraps wherever it is seamless
    with circular_padding(session.model.unet, x=wrap_x, y=wrap_y):
        return session.optimize_latent(z, callback=callback)


def decode_canvas(model: LoadedModel, z: torch.Tensor, plan: CanvasPlan) -> np.ndarray:
    """Decode tile by tile (never the whole canvas at once): (H, W, 3) floats in [0, 1]."""
    wrap_x, wrap_y = plan.wrap
    with circular_padding(model.vae, x=wrap_x, y=wrap_y):
        return decode_tiled(
            model, z, tile=DECODE_TILE, overlap=DECODE_OVERLAP, wrap_x=wrap_x, wrap_y=wrap_y
        )[0]


def canvas_work(plan: CanvasPlan, settings: Settings) -> memory.Work:
    """What a canvas holds at once (`engine.memory`): `view_batch` windows through the UNet (AD
    refines them with a backward pass, one at a time when all would not fit), or the whole canvas
    when optimising; a decode tile; the
    canvas as float arrays while it decodes."""
    width, height = plan.size
    tile = 8 * (DECODE_TILE + 2 * DECODE_OVERLAP)
    decode = (min(width, tile), min(height, tile))
    if settings.mode == "optimize":
        return memory.Work(plan.size, grad_rows=1, decode=decode, canvas=plan.size)
    window = (min(width, 8 * plan.window), min(height, 8 * plan.window))
    rows = plan.view_batch * cfg_rows(settings)
    grad = 1 if settings.style_mode != "none" else 0  # window by window if need be (ad.memory_plan)
    return memory.Work(window, rows=rows, grad_rows=grad, decode=decode, canvas=plan.size)


def synthesize(
    session: Session,
    exemplar: Image.Image,
    plan: CanvasPlan,
    *,
    seed: int,
    masks: LabelMaps | None = None,
    noise: torch.Tensor | None = None,
    callback: Callable[[int, int], None] | None = None,
    control: Control | None = None,
) -> np.ndarray:
    """One texture: noise (from `seed` unless given) → guided canvas → tiled decode, (H, W, 3).

    The exemplar is the AD reference (style mode ad, or optimize mode); its reference noise comes
    from the session's own stream for `seed`, never the canvas's.
    """
    s = session.settings
    generator = torch.Generator("cpu").manual_seed(seed)
    z = initial_noise(session, plan, generator) if noise is None else noise
    if s.style_mode != "none" or s.mode == "optimize":
        session = session.with_references([exemplar], seed=seed, masks=masks)
    if s.mode == "optimize":
        z = optimize_canvas(session, plan, z, callback=callback)
    else:
        z = sample_canvas(session, plan, z, generator=generator, callback=callback, control=control)
    return decode_canvas(session.model, z, plan)


# --- label maps --------------------------------------------------------------------------------


def label_ids(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A label map image at `size` (nearest) as (H, W) labels: equal colours, equal labels.

    The label is the colour as one number, r·2¹⁶ + g·2⁸ + b < 2²⁴, so float32 holds it exactly.
    """
    rgb = np.asarray(image.convert("RGB").resize(size, Image.Resampling.NEAREST), dtype=np.int64)
    ids = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]  # (H, W)
    return torch.from_numpy(ids.astype(np.float32))


def label_maps(
    source: Image.Image, target: Image.Image, exemplar_size: tuple[int, int], size: tuple[int, int]
) -> LabelMaps:
    """AD label masks: the source map over the exemplar, the target map over the canvas."""
    return LabelMaps(label_ids(target, size), [label_ids(source, exemplar_size)])


def multiple_of_8(size: tuple[int, int], flag: str) -> tuple[int, int]:
    """A label map's size rounded down to multiples of 8, as exemplars are."""
    width, height = size[0] // 8 * 8, size[1] // 8 * 8
    if not width or not height:
        raise UsageError(f"{flag} is {size[0]}x{size[1]}: smaller than 8 px")
    return width, height


def to_image(arr: np.ndarray) -> Image.Image:
    """(H, W, 3) floats in [0, 1] → 8-bit RGB, rounding like diffusers; `arr` is overwritten.

    In place, because at 4096² every float copy of the canvas is 200 MB.
    """
    np.multiply(arr, 255, out=arr)
    np.round(arr, out=arr)
    return Image.fromarray(arr.astype(np.uint8))


def read_label_map(path: str | Path, flag: str) -> Image.Image:
    """Read a label map image; a missing or unreadable one is a usage error of the whole run."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        return open_rgb(path)
    except InputError as exc:
        raise UsageError(f"{flag} {exc}") from exc


# --- the batch tasks ---------------------------------------------------------------------------


def rounded_notice(own: tuple[int, int], exemplar: tuple[int, int]) -> str | None:
    """The notice for a texture at its exemplar's size that is smaller only by the rounding of
    its sides to multiples of 8 (an exemplar scaled down by --max-size is not this case)."""
    if own == exemplar or (own[0] // 8 * 8, own[1] // 8 * 8) != exemplar:
        return None
    return (
        f"sizes are rounded down to multiples of 8 ({own[0]}x{own[1]} → "
        f"{exemplar[0]}x{exemplar[1]}); outputs record their exemplar's size, and --size sets "
        "the texture's"
    )


def texture_settings(
    settings: Settings | None, preset: str | None, overrides: dict, defaults: dict
) -> Settings:
    """Defaults < preset < texture defaults < explicit overrides (None means not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    resolved = resolve_settings(settings, preset, {**defaults, **given})
    if resolved.style_mode not in STYLE_MODES:
        raise UsageError(
            f"--style-mode {resolved.style_mode!r}: textures are guided by attention "
            f"distillation; choose one of {', '.join(STYLE_MODES)}"
        )
    return resolved


def texture_metadata(
    session: Session,
    plan: CanvasPlan,
    *,
    task: str,
    seed: int,
    exemplar: str,
    exemplar_size: tuple[int, int],
    masks: tuple[str, str] | None = None,
) -> dict:
    """Everything needed to reproduce a texture, for the PNG/EXIF settings chunk: the session's
    record with the exemplar and canvas in place of the image-to-image settings."""
    s = session.settings
    optimize = s.mode == "optimize"
    ad_on = optimize or s.style_mode == "ad"
    windowed = None if optimize else plan
    return session.metadata(seed=seed, size=plan.size) | {
        "task": task,
        "cfg_scale": None if optimize else s.cfg,
        "strength": None,
        "exemplar": exemplar,
        "exemplar_size": f"{exemplar_size[0]}x{exemplar_size[1]}",
        "style_mode": "ad" if ad_on else "none",
        "ad_iters": s.ad_iters if ad_on and not optimize else None,
        "ad_lr": (s.opt_lr if optimize else s.ad_lr) if ad_on else None,
        "ad_adain": s.ad_adain if ad_on and not optimize else None,
        "content_weight": None,
        "window": windowed and plan.window,
        "stride": windowed and plan.stride,
        "view_batch": windowed and plan.view_batch,
        "windows": windowed and len(plan.windows()),
        "seamless": plan.seamless,
        "source_mask": masks[0] if masks else None,
        "target_mask": masks[1] if masks else None,
    }


@dataclass(frozen=True)
class Canvas:
    """The canvas options of a batch; `size` None means each exemplar's own size (texture only)."""

    size: tuple[int, int] | None
    window: int | None
    stride: int | None
    view_batch: int
    seamless: str | None

    def plan(self, size: tuple[int, int], native: int) -> CanvasPlan:
        return plan_canvas(
            size,
            native=native,
            window=self.window,
            stride=self.stride,
            view_batch=self.view_batch,
            seamless=self.seamless,
        )


def run_textures(
    task: str,
    inputs: Sequence[str],
    canvas: Canvas,
    settings: Settings,
    *,
    output: Output | None,
    runtime: Runtime | None,
    max_size: int | None,
    masks: tuple[str | Path, str | Path] | None = None,
    events: Events | None = None,
) -> BatchReport:
    """The batch loop both tasks share: one model load, then one texture per exemplar."""
    check_window_options(canvas.window, canvas.stride, canvas.view_batch, canvas.seamless)
    output = with_seed(output or Output())
    jobs = plan_files(list(inputs), output)
    maps = None
    if masks is not None:
        maps = (
            read_label_map(masks[0], "--source-mask"),
            read_label_map(masks[1], "--target-mask"),
        )
    size = canvas.size or (multiple_of_8(maps[1].size, "--target-mask") if maps else None)
    state: dict[str, Session] = {}
    events = events or Events()
    say_once = SayOnce(events)
    runtime = runtime or Runtime()
    check_sources(settings, runtime)
    find_control, control_files = control_image_finder(settings)
    if map_only_controls(settings, task):
        refuse_overwriting_files(jobs, control_files, "--control-image")

    def check() -> None:
        """The canvas, before the model loads (its window: the family's); on --dry-run too."""
        if size is not None:

            def work(family: str) -> memory.Work:
                native = memory.NATIVE_LATENT.get(family, 128)
                return canvas_work(canvas.plan(size, native), settings)

            what, hint = f"texture {size[0]}x{size[1]}", "choose a smaller --size"
            check_fits(settings, runtime, work, what=what, hint=hint)

    def plan_size(job: Job) -> tuple[int, int] | None:
        """The texture's size on --dry-run, from the exemplar's header and the model's config."""
        native = planned_native_px(settings)
        if native is None:
            return size
        own = fitted_size(job.input, max_size=max_size or native)
        if size is None:
            say_once("rounded", rounded_notice(image_size(job.input), own))
        return canvas.plan(size or own, native // 8).size

    def prepare() -> None:
        events.loading(settings.model)
        session = open_session(settings, runtime, task="noise")
        announce(session.model, events)
        if size is not None:  # bad window options fail the run here, not every job
            canvas.plan(size, session.native)
        state["session"] = session

    def process(job: Job, seed: int):
        session = state["session"]
        exemplar = load_image(job.input, max_size=max_size or 8 * session.native)
        plan = canvas.plan(size or exemplar.size, session.native)
        own = image_size(job.input)
        if size is None:  # a canvas the exemplar's size (an explicit one was checked up front)
            say_once("rounded", rounded_notice(own, exemplar.size))
            what = f"{job.input}: texture {plan.size[0]}x{plan.size[1]}"
            work = canvas_work(plan, settings)
            hint = "give a smaller --size or --max-size"
            check_fits(
                settings, runtime, work, what=what, hint=hint, model=session.model, error=InputError
            )
        lm = label_maps(*maps, exemplar.size, plan.size) if maps else None
        given = read_control_image(find_control(job), plan.size) if find_control else None
        control = session.control_for([[given.image] * len(session.controls)]) if given else None
        arr = synthesize(
            session, exemplar, plan, seed=seed, masks=lm, callback=events.step, control=control
        )
        names = (Path(masks[0]).name, Path(masks[1]).name) if masks else None
        meta = texture_metadata(
            session,
            plan,
            task=task,
            seed=seed,
            exemplar=job.input.name,
            exemplar_size=exemplar.size,
            masks=names,
        )
        meta["input_size"] = f"{own[0]}x{own[1]}" if own != exemplar.size else None
        return to_image(arr), meta | (given.settings() if given else {})

    return run_jobs(
        jobs, output, process, prepare=prepare, check=check, plan_size=plan_size, events=events
    )


def texture_expand(
    inputs: Sequence[str],
    *,
    size: tuple[int, int] | None,
    window: int | None = None,
    stride: int | None = None,
    view_batch: int = DEFAULT_VIEW_BATCH,
    seamless: str | None = None,
    settings: Settings | None = None,
    preset: str | None = None,
    output: Output | None = None,
    runtime: Runtime | None = None,
    max_size: int | None = None,
    events: Events | None = None,
    **overrides,
) -> BatchReport:
    """Expand every exemplar to a `size` = (W, H) px texture; returns a BatchReport.

    Window and stride are in latents (8 px); `seamless` is None, "x", "y" or "xy"; `max_size`
    caps the exemplar's longer side (default: the model's native size). See the module docstring.
    """
    if size is None:
        raise UsageError("texture-expand needs --size WxH (the texture to make)")
    settings = texture_settings(settings, preset, overrides, EXPAND_DEFAULTS)
    if settings.mode != "sample":
        raise UsageError("texture-expand samples; use `stylekit texture --mode optimize`")
    canvas = Canvas(size, window, stride, view_batch, seamless)
    return run_textures(
        "texture-expand",
        inputs,
        canvas,
        settings,
        output=output,
        runtime=runtime,
        max_size=max_size,
        events=events,
    )


def texture(
    inputs: Sequence[str],
    *,
    size: tuple[int, int] | None = None,
    source_mask: str | Path | None = None,
    target_mask: str | Path | None = None,
    window: int | None = None,
    stride: int | None = None,
    view_batch: int = DEFAULT_VIEW_BATCH,
    seamless: str | None = None,
    settings: Settings | None = None,
    preset: str | None = None,
    output: Output | None = None,
    runtime: Runtime | None = None,
    max_size: int | None = None,
    events: Events | None = None,
    **overrides,
) -> BatchReport:
    """Synthesise a texture like each exemplar, at its size unless `size`; returns a BatchReport.

    `mode="optimize"` runs AD's optimisation from noise instead of guided sampling. With
    `source_mask` (over the exemplar) and `target_mask` (over the canvas, whose size it gives when
    `size` is None) the canvas's regions copy the exemplar's regions of the same colour.
    """
    if (source_mask is None) != (target_mask is None):
        raise UsageError("controlled synthesis needs both --source-mask and --target-mask")
    settings = texture_settings(settings, preset, overrides, TEXTURE_DEFAULTS)
    if settings.controls or settings.control_image:
        raise UsageError("texture takes no ControlNet; texture-expand does (--control-image)")
    masks = (source_mask, target_mask) if source_mask is not None else None
    canvas = Canvas(size, window, stride, view_batch, seamless)
    return run_textures(
        "texture",
        inputs,
        canvas,
        settings,
        output=output,
        runtime=runtime,
        max_size=max_size,
        masks=masks,
        events=events,
    )
