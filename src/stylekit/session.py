"""One loaded run: the model, its sampler, the prompt/style conditioning, the AD references and
their cached features, and the settings every output records. `open_session` is the one factory
every task (stylize, t2i-styled, inpaint, video, textures) builds its run with.

    from stylekit.session import Runtime, open_session
    session = open_session(settings, Runtime(), style=[ref], seed=1)
    out = session.img2img([photo], seeds=[1])[0]

Style references reach the model through IP-Adapter (style mode ipadapter), attention
distillation guidance (ad), or both. AD's reference noise is drawn once per run from its own seed
stream, never an image's (docs/attention-distillation.md), and the reference features are cached
per timestep by the session, so they are computed once per run whatever the number of images,
frames or windows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stylekit import __version__, control
from stylekit.engine import ad, conditioning, memory, models, sampling
from stylekit.engine import style as style_engine
from stylekit.engine.ad_loss import LabelMaps
from stylekit.engine.latents import decode, to_pil
from stylekit.engine.sampling import AfterStep
from stylekit.engine.tiling import View
from stylekit.errors import InputError, ModelError, StylekitError, UsageError
from stylekit.media.images import Sizing, load_image, resized
from stylekit.presets import Settings, load_preset
from stylekit.runner import Events, Output, base_seed

Callback = Callable[[int, int], None]


@dataclass(frozen=True)
class Runtime:
    """How to run (not what): device, dtype, loading permissions, and the memory check."""

    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    model_config: str | None = None  # diffusers config for a single-file checkpoint
    size_check: bool = True  # refuse sizes that `engine.memory` says will not fit
    models: ModelPool | None = None  # hands a loaded model on to the next run (`stylekit sweep`)


class ModelPool:
    """The last model loaded, handed to the next run that would load the very same one.

    Runs differ in their sampling settings (steps, CFG, prompt, style scale, AD knobs, seed)
    without a new load. What `models.load` builds from the spec (model, variant, LoRAs, VAEs,
    IP-Adapter on or off, the accelerator) must match; the strength and the task only count
    through the accelerator `choose_accelerator` picks for them. One model is held at a time:
    the previous one is let go before the next loads.
    """

    def __init__(self) -> None:
        self.spec: models.ModelSpec | None = None
        self.model: models.LoadedModel | None = None
        self.loads = 0

    def load(self, spec: models.ModelSpec) -> models.LoadedModel:
        held, model = self.spec, self.model
        if model is not None and self.same_weights(held, spec, model):
            before = models.choose_accelerator(held, model.family, model.turbo)
            after = models.choose_accelerator(spec, model.family, model.turbo)
            swap = {before.notice: after.notice, before.warning: after.warning}
            return replace(
                model,
                notices=tuple(n for n in (swap.get(n, n) for n in model.notices) if n),
                warnings=tuple(w for w in (swap.get(w, w) for w in model.warnings) if w),
            )
        self.spec = self.model = model = None
        memory_release()
        self.model, self.spec = models.load(spec), spec
        self.loads += 1
        return self.model

    @staticmethod
    def same_weights(held: models.ModelSpec, spec: models.ModelSpec, model) -> bool:
        """Whether `spec` loads what `held` loaded: equal but for strength and task, and the
        same accelerator for them."""
        if replace(spec, strength=held.strength, task=held.task) != held:
            return False
        chosen = models.choose_accelerator(spec, model.family, model.turbo).source
        return chosen == model.accelerator


def memory_release() -> None:
    """Give a dropped model's memory back before the next one loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_batch(runtime: Runtime) -> int:
    """Images per UNet call: 4 on a CPU (SD1.5 at 256 px: 0.41 s per image in a batch of 4 vs
    0.56 s alone, 2 threads, bf16), 2 on an accelerator, where batching gains less and memory is
    scarcer."""
    return 4 if models.resolve_device(runtime.device).type == "cpu" else 2


def resolve_settings(settings: Settings | None, preset: str | None, overrides: dict) -> Settings:
    """Defaults < preset < explicit overrides (None values mean "not given")."""
    base = settings if settings is not None else load_preset(preset)
    return base.with_overrides(**overrides)


def with_seed(output: Output) -> Output:
    """Fix the batch's base seed up front (random if not given) so every part of the run shares it."""
    if output.seed is not None:
        return replace(output, seed=base_seed(output.seed))
    return replace(output, seed=base_seed(None), seed_drawn=True)


def check_schedule(settings: Settings, task: str) -> None:
    """Refuse steps the strength's schedule cannot run (`--steps 8 --strength 0.1` needs a grid
    of 80 of the 50 timesteps) before the model loads: a dry run refuses it as the run would."""
    if task in ("img2img", "video") and settings.mode == "sample":
        turbo, _ = models.detect_turbo(settings.model, settings.turbo)
        sampling.img2img_schedule(settings.steps, settings.strength, turbo=turbo)


@lru_cache(maxsize=4)
def planned_native_px(settings: Settings) -> int | None:
    """The model's native side in px (`native_px`) read off its configs before it loads, for a
    dry run's sizes; None where only the load can tell (a single-file checkpoint, a hub id not
    in the cache offline)."""
    try:
        unet, vae = models.read_configs(settings.model)
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (StylekitError, OSError, ValueError, KeyError, TypeError):  # TypeError: no config
        return None


def size_notice(sizing: Sizing, what: str = "outputs") -> Callable[[Session], str]:
    """The run's working-size notice (`LazySession`'s `announce`), once the model is known."""

    def announce(session: Session) -> str:
        written = "the input's size" if sizing.keep_size else "the working size"
        return f"working size: {sizing.describe(session.native_px)}; {what} at {written}"

    return announce


def load_style_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """Load the style references up front: a missing or bad one is a usage error of the run
    (exit 2), raised before the model loads."""
    images = []
    for path in paths:
        try:
            images.append(load_image(Path(path)))
        except InputError as exc:
            raise UsageError(f"--style {exc}") from exc
    return images


def content_hash(path: str | Path) -> str:
    """A short content hash of a file (the first 12 hex digits of its SHA-256), recorded next to
    a reference's path so that a changed or moved file can be told from the one that was used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def check_sources(settings: Settings, runtime: Runtime, style: Sequence = ()) -> None:
    """Refuse a missing local model, LoRA, accelerator, tiny VAE or IP-Adapter, a bad LoRA
    scale or a pickle without --allow-pickle now, before anything loads (exit 2). Hub ids can
    only be checked when they load."""
    spec = model_spec(
        settings, runtime, ip_adapter=wants_ip_adapter(settings, style), task="video"
    )  # the video task's spec: it names everything any task loads (the motion adapter too)
    models.check_local_sources(spec)
    control.check_control_sources(settings, allow_pickle=runtime.allow_pickle)


def cfg_rows(settings: Settings) -> int:
    """UNet rows per image: 2 with classifier-free guidance (cfg > 1), else 1."""
    return 2 if settings.cfg > 1 else 1


def image_work(
    settings: Settings, size: tuple[int, int], style: Sequence, *, batch: int = 1, stages: int = 1
) -> memory.Work:
    """What `batch` images (or a video's `stages` in flight) of `size` (W, H) hold at once."""
    if settings.mode == "optimize":
        return memory.Work(size, rows=1, grad_rows=1)
    ad_rows = (
        1 if uses_ad(settings, style) else 0
    )  # AD refines row by row if need be (ad.memory_plan)
    return memory.Work(size, rows=batch * stages * cfg_rows(settings), grad_rows=ad_rows)


def size_flag_check(
    settings: Settings,
    runtime: Runtime,
    size: tuple[int, int] | None,
    style: Sequence,
    *,
    batch: int = 1,
    stages: int = 1,
) -> Callable[[], None]:
    """`LazySession`'s `before`: refuse an explicit `--size` whose job would not fit, before the
    model loads (every image or frame of the run has that size)."""

    def check() -> None:
        if size is not None:
            work = image_work(settings, size, style, batch=batch, stages=stages)
            what = f"--size {size[0]}x{size[1]}"
            check_fits(settings, runtime, work, what=what, hint="choose a smaller --size")

    return check


def check_fits(
    settings: Settings,
    runtime: Runtime,
    work: memory.Work | Callable[[str], memory.Work],
    *,
    what: str,
    hint: str,
    model: models.LoadedModel | None = None,
    error: type[StylekitError] = UsageError,
    controls: Sequence[control.LoadedControl] | None = None,
    depth_loaded: bool = False,
) -> None:
    """Refuse `work` (or `work(family)`) when `engine.memory` estimates it will not fit, unless
    --no-size-check.

    Before the model loads (`model` None) the estimate counts its weights, from the family read
    off the model's config; a model whose config cannot be read is left to the load, which says
    why. After the load it uses the loaded model and what is still free.

    Every control's ControlNet counts too (`control_nets`): the loaded `controls`' configs, else
    the flags' (a local net's config, or the family's default), and the depth estimator's
    weights while it is not loaded (`depth_loaded`); the message names the controls."""
    if not runtime.size_check:
        return
    if model is None:
        device = models.resolve_device(runtime.device)
        dtype = models.resolve_dtype(runtime.dtype, device)
        try:
            family = models.detect_family(settings.model, allow_pickle=runtime.allow_pickle)
        except ModelError:  # e.g. a hub id not in the cache offline: the load reports it
            return
        widths = folder_widths(settings.model)
    else:
        device, dtype, family = model.device, model.dtype, model.family
        widths = first_width(model.unet.config), first_width(model.vae.config)
    work = work(family) if callable(work) else work
    vae_bytes = 4 if family == "sdxl" and dtype == torch.float16 else dtype.itemsize  # upcast
    nets, depth = control_nets(settings, family, controls)
    est = memory.estimate(
        work,
        family,
        dtype_bytes=dtype.itemsize,
        vae_bytes=vae_bytes,
        widths=widths,
        weights=model is None,
        controls=nets,
        depth=depth and not depth_loaded,
    )
    reason = memory.too_big(est, memory.available(device))
    if reason:
        if nets:
            what += f" with ControlNet{'s' if len(nets) > 1 else ''} "
            what += ", ".join(n.name for n in nets)
        raise error(f"{what}: {reason} on {device.type}; {hint}, or pass --no-size-check")


def control_nets(
    settings: Settings, family: str, loaded: Sequence[control.LoadedControl] | None = None
) -> tuple[list[memory.ControlNet], bool]:
    """The run's ControlNets as `memory.estimate` counts them, and whether the depth estimator
    will run (a depth control whose map is not a `--control-image`).

    Loaded nets give their own config; before the load a `--controlnet` folder gives its
    config.json, anything else (the family's default, a hub id, a file) is taken as the
    family's layout at the UNet's width."""
    if loaded is not None:
        specs = [c.spec for c in loaded]
        configs = [dict(c.net.config) for c in loaded]
    else:
        specs = control.control_specs(settings, check_tools=False)
        configs = [net_config(s.controlnet) for s in specs]
    nets = [
        memory.ControlNet(s.kind, family, None)
        if config is None
        else memory.ControlNet(s.kind, models.family_of_unet(config), first_width(config))
        for s, config in zip(specs, configs, strict=True)
    ]
    given = control.image_type(settings, [s.kind for s in specs]) if specs else None
    return nets, any(s.kind == "depth" and s.kind != given for s in specs)


def net_config(source: str | None) -> dict | None:
    """A local ControlNet folder's config.json, read before loading (None: not at hand)."""
    if source is None:
        return None
    try:
        return json.loads((Path(source).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None


def wants_ip_adapter(settings: Settings, style: Sequence) -> bool:
    """Whether this run injects the style references through IP-Adapter."""
    return (
        bool(style) and settings.style_mode in ("ipadapter", "both") and settings.mode == "sample"
    )


def check_references(settings: Settings, style: Sequence) -> None:
    """Refuse optimize mode without a reference (there is nothing to optimise towards), and
    references with style mode none, which would ignore them: asking for a style and getting
    none is not a choice to make silently (the sd-turbo preset's style mode is none)."""
    if settings.mode == "optimize" and not style:
        raise UsageError("--mode optimize needs at least one --style reference")
    if style and settings.mode == "sample" and settings.style_mode == "none":
        raise UsageError(
            "--style is given but the style mode is none (the preset's, or --style-mode), so "
            "the references would be ignored; add --style-mode ad, ipadapter or both, "
            "or drop --style"
        )


def uses_ad(settings: Settings, style: Sequence) -> bool:
    """Whether AD guidance runs: references and style mode ad/both, or optimize mode."""
    return bool(style) and (settings.style_mode in ("ad", "both") or settings.mode == "optimize")


def content_default(mode: str) -> float:
    """The AD release's content weight: 0.25 for optimisation transfer, none when sampling."""
    return 0.25 if mode == "optimize" else 0.0


def reference_generator(seed: int) -> torch.Generator:
    """The generator of a run's AD reference noise: its own stream, derived from the run's seed.

    Images use seed + i, a canvas its job's seed: seeding the reference noise with the same number
    would noise a reference of the same shape exactly like the image.
    """
    derived = np.random.SeedSequence(seed, spawn_key=(1,)).generate_state(2, np.uint32)
    return torch.Generator("cpu").manual_seed(int(derived[0]) << 31 | int(derived[1]) >> 1)


def model_spec(
    settings: Settings, runtime: Runtime, *, ip_adapter: bool, task: str = "img2img"
) -> models.ModelSpec:
    """Translate settings into what the engine loads; `task` (img2img, noise, video) is where the
    command's sampling starts, which decides the accelerator `auto` picks."""
    return models.ModelSpec(
        model=settings.model,
        loras=tuple(models.LoraSpec.parse(s) for s in settings.loras),
        accelerator=settings.accelerator,
        strength=settings.strength,
        task=task,
        scheduler=settings.scheduler,
        tiny_vae=tiny_vae(settings) or False,
        vae=settings.vae,
        ip_adapter=settings.ip_adapter if ip_adapter else None,
        image_encoder=settings.image_encoder,
        device=runtime.device,
        dtype=runtime.dtype,
        allow_pickle=runtime.allow_pickle,
        model_config=runtime.model_config,
        variant=settings.variant,
        turbo=settings.turbo,
        motion_adapter=settings.motion_adapter if task == "video" else None,
    )


def tiny_vae(settings: Settings) -> str | bool | None:
    """The tiny VAE to decode with: its id or folder, True for the family's default, or None.

    `--tiny-vae-model` alone implies `--tiny-vae`: naming a tiny VAE and not using it would be a
    silent no-op."""
    if settings.tiny_vae_model:
        return settings.tiny_vae_model
    return True if settings.tiny_vae else None


def tiny_vae_source(settings: Settings, family: str) -> str | None:
    """The tiny VAE a run of `family` decodes with (the family's default for a bare
    `--tiny-vae`), or None: what its outputs record."""
    source = tiny_vae(settings)
    return models.TINY_VAE[family] if source is True else source


def ad_options(settings: Settings) -> ad.ADOptions:
    """AD knobs from the settings (the content weight defaults by mode)."""
    s = settings
    weight = s.content_weight if s.content_weight is not None else content_default(s.mode)
    return ad.ADOptions(
        iters=s.ad_iters,
        lr=s.ad_lr,
        adain=s.ad_adain,
        content_weight=weight,
        checkpointing=s.ad_checkpointing,
    )


def native_px(model: models.LoadedModel) -> int:
    """The model's native side in pixels: the UNet's `sample_size` x the VAE's scale factor."""
    return int(model.unet.config.sample_size) * int(model.pipe.vae_scale_factor)


def open_session(
    settings: Settings,
    runtime: Runtime = Runtime(),
    *,
    style: Sequence[Image.Image] = (),
    style_names: Sequence[str] = (),
    style_hashes: Sequence[str] = (),
    seed: int = 0,
    task: str = "img2img",
) -> Session:
    """Load the model, build its sampler, encode the prompt and the style references: one run.

    `task` says where sampling starts: "img2img" (stylize, inpaint), "noise" (t2i-styled,
    textures) or "video"; `--accelerator auto` picks the LoRA distilled for it.

    With style mode ad/both (or optimize mode) the references are resized to the model's native
    size, as the AD release does, encoded once, and given their fixed noise (see
    `reference_generator`). IP-Adapter references are scaled down to the working size first, by
    the same rule as content images (`Sizing`): the CLIP image processor then resizes them to its
    own 224 px anyway, so this only bounds the memory a 12-megapixel reference takes.
    """
    use_ad, use_ip = uses_ad(settings, style), wants_ip_adapter(settings, style)
    spec = model_spec(settings, runtime, ip_adapter=use_ip, task=task)
    model = runtime.models.load(spec) if runtime.models is not None else models.load(spec)
    config = dict(model.pipe.scheduler.config)
    sampler = sampling.make_sampler(settings.scheduler, config, gamma=settings.gamma)
    cond = conditioning.encode_text(model, settings.prompt, settings.negative, cfg=settings.cfg)
    if use_ip:
        style_engine.set_style_scale(model.unet, settings.style_scale)
        native = native_px(model)
        capped = [resized(im, Sizing().working(im.size, native)) for im in style]
        cond = conditioning.with_style_images(model, cond, capped)
    controls = control.load_controls(model, settings, allow_pickle=runtime.allow_pickle)
    session = Session(
        settings,
        model,
        sampler,
        cond,
        style_names=list(style_names),
        style_hashes=list(style_hashes),
        task=task,
        controls=controls,
    )
    if not use_ad:
        return session
    side = session.native_px
    sized = [im.resize((side, side), Image.Resampling.BICUBIC) for im in style]
    return session.with_references(sized, seed=seed)


class Session:
    """A loaded run; its methods run the tasks' images through the one sampling loop."""

    def __init__(
        self,
        settings: Settings,
        model: models.LoadedModel,
        sampler: sampling.Sampler,
        cond: conditioning.Conditioning,
        *,
        style_names: Sequence[str] = (),
        style_hashes: Sequence[str] = (),
        references: ad.References | None = None,
        feature_cond: conditioning.Conditioning | None = None,
        task: str = "img2img",
        controls: Sequence[control.LoadedControl] = (),
    ):
        self.settings, self.model, self.sampler, self.cond = settings, model, sampler, cond
        self.style_names = list(style_names)  # the references' paths as given
        self.style_hashes = list(style_hashes)  # and their `content_hash`es
        self.task = task  # where sampling starts: img2img, noise or video (see `open_session`)
        self.controls = list(controls)  # ControlNets loaded once for the run
        self._depth = None  # the depth estimator, loaded on first use
        self.references = references
        self.features = ad.FeatureCache()  # the references' features per timestep, this run's
        self.feature_cond = feature_cond  # AD's empty-prompt conditioning, encoded once per run

    @property
    def native(self) -> int:
        """The UNet's native latent size (64 for SD1.5, 128 for SDXL)."""
        return int(self.model.unet.config.sample_size)

    @property
    def native_px(self) -> int:
        """The model's native side in pixels (512 for SD1.5, 1024 for SDXL)."""
        return native_px(self.model)

    def with_references(
        self, images: Sequence[Image.Image], *, seed: int, masks: LabelMaps | None = None
    ) -> Session:
        """The same loaded model with these AD references (and a fresh feature cache); the
        feature passes' conditioning is encoded once and shared (textures: one per exemplar)."""
        if self.feature_cond is None:
            self.feature_cond = ad.feature_conditioning(self.model, self.cond.image_embeds)
        refs = ad.make_references(
            self.model,
            images,
            noise=reference_generator(seed),
            options=ad_options(self.settings),
            masks=masks,
            cond=self.feature_cond,
        )
        return Session(
            self.settings,
            self.model,
            self.sampler,
            self.cond,
            style_names=self.style_names,
            style_hashes=self.style_hashes,
            references=refs,
            feature_cond=self.feature_cond,
            task=self.task,
            controls=self.controls,
        )

    # --- structure control -------------------------------------------------------------------

    @property
    def control_given(self) -> str | None:
        """The control type whose map comes from `--control-image` (None: all computed)."""
        kinds = [c.spec.kind for c in self.controls]
        return control.image_type(self.settings, kinds) if self.controls else None

    def depth_estimator(self):
        """The depth-estimation pipeline, loaded once per run on first use."""
        if self._depth is None:
            self._depth = models.load_depth_estimator(self.settings.depth_model, self.model.device)
        return self._depth

    def control_maps(self, image: Image.Image, given: Image.Image | None = None) -> list:
        """Every control's map for a content image at its working size; the `--control-image`
        type takes `given` (already at that size)."""
        maps = []
        for c in self.controls:
            if c.spec.kind == self.control_given:
                if given is None:
                    raise InputError(f"no control image for the {c.spec.kind} control")
                maps.append(given)
            else:
                maps.append(
                    control.control_map(c.spec.kind, image, self.settings, self.depth_estimator)
                )
        return maps

    def control_for(self, maps: Sequence[Sequence[Image.Image]]):
        """The engine's `Control` for rows of maps (one list per image), or None without controls."""
        from stylekit.engine.controlnet import Control, image_tensor

        if not self.controls:
            return None
        images = tuple(
            image_tensor([row[k] for row in maps]).to(self.model.device)
            for k in range(len(self.controls))
        )
        s = self.settings
        return Control(
            tuple(c.net for c in self.controls),
            images,
            tuple(c.spec.scale for c in self.controls),
            s.control_start,
            s.control_end,
        )

    def control_metadata(self) -> list[dict] | None:
        """What every output records of the run's controls (None without)."""
        if not self.controls:
            return None
        given = self.control_given
        return [control.describe(c.spec, c.source, self.settings, given) for c in self.controls]

    # --- hooks of the sampling loop ------------------------------------------------------------

    def guidance(
        self,
        ts: Sequence[int],
        *,
        z0: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        windows: Sequence[View] | None = None,
        view_batch: int = 4,
        control=None,
    ) -> AfterStep:
        """AD refinement after every step of a trajectory over `ts` (see `ad.guidance`); over
        MultiDiffusion `windows`, of each window (`ad.windowed_guidance`); with `control`'s
        ControlNet residuals in its passes."""
        refs, ac = self.references, self.sampler.ac
        if windows is not None:
            return ad.windowed_guidance(
                self.model,
                refs,
                self.features,
                ts,
                ac,
                windows,
                view_batch=view_batch,
                z0=z0,
                noise=noise,
                control=control,
            )
        return ad.guidance(
            self.model, refs, self.features, ts, ac, z0=z0, noise=noise, control=control
        )

    @property
    def guided(self) -> Callable[..., AfterStep] | None:
        """`guidance` when this run has AD references, else None: what the engine takes."""
        return self.guidance if self.references is not None else None

    # --- images ----------------------------------------------------------------------------------

    def img2img(
        self,
        images: Sequence[Image.Image],
        seeds: Sequence[int],
        *,
        callback: Callback = None,
        given: Sequence[Image.Image | None] | None = None,
    ) -> list[Image.Image]:
        """Stylise same-size images in one UNet batch; image i is what it would be alone with seed i.

        Each image gets a CPU generator seeded once, so results match diffusers' pipelines.
        `given[i]` is image i's precomputed control map (`--control-image`), if any.
        """
        from stylekit.engine.img2img import img2img

        s = self.settings
        if s.mode == "optimize":
            return [self.optimize(im, callback=callback) for im in images]
        arr = img2img(
            self.model,
            self.cond,
            self.sampler,
            list(images),
            steps=s.steps,
            strength=s.strength,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            guidance=self.guided,
            callback=callback,
            control=self.control_of(images, given),
        )
        return [to_pil(a) for a in arr]

    def control_of(self, images: Sequence[Image.Image], given=None):
        """The engine `Control` of content images (their maps computed or given), or None."""
        if not self.controls:
            return None
        given = given or [None] * len(images)
        return self.control_for(
            [self.control_maps(im, g) for im, g in zip(images, given, strict=True)]
        )

    def frame_control(self, given: Image.Image | None = None):
        """A video frame → its `Control` (maps computed per frame; `given` one precomputed map
        for every frame, resized to the frame)."""

        def of(frame: Image.Image):
            return self.control_of([frame], [given and resized(given, frame.size)])

        return of

    def img2img_tiled(
        self,
        image: Image.Image,
        seed: int,
        plan,
        *,
        callback: Callback = None,
        given: Image.Image | None = None,
    ) -> Image.Image:
        """Stylise one image at its own size over the MultiDiffusion windows of `plan` (a
        `tasks.textures.CanvasPlan` of the image's latent size), tiled VAE in and out."""
        from stylekit.engine.img2img import img2img
        from stylekit.engine.windows import Windows

        s = self.settings
        if s.mode == "optimize":
            raise UsageError("--tiled runs guided sampling; --mode optimize has no windows")
        if image.size != plan.size:
            raise ValueError(f"image {image.size} and canvas {plan.size} differ")
        arr = img2img(
            self.model,
            self.cond,
            self.sampler,
            [image],
            steps=s.steps,
            strength=s.strength,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            guidance=self.guided,
            callback=callback,
            windows=Windows.of(plan),
            control=self.control_of([image], [given]),
        )
        return to_pil(arr[0])

    def generate(
        self,
        width: int,
        height: int,
        *,
        seed: int,
        callback: Callback = None,
        given: Image.Image | None = None,
    ) -> Image.Image:
        """Text-to-image from pure noise in `steps` evaluations (AD-guided when references are
        set); with controls, `given` is the control map at (width, height)."""
        from stylekit.engine.txt2img import txt2img

        if width % 8 or height % 8:
            raise UsageError(f"size {width}x{height}: both sides must be multiples of 8")
        arr = txt2img(
            self.model,
            self.cond,
            self.sampler,
            width,
            height,
            steps=self.settings.steps,
            generator=torch.Generator("cpu").manual_seed(seed),
            guidance=self.guided,
            callback=callback,
            control=self.control_for([[given] * len(self.controls)]) if self.controls else None,
        )
        return to_pil(arr)

    def optimize(self, image: Image.Image, *, callback: Callback = None) -> Image.Image:
        """AD's optimisation-based transfer from the content latent (deterministic, no seed)."""
        z = ad.clean_latent(self.model, image)
        z = self.optimize_latent(z, content=z, callback=callback)
        return to_pil(decode(self.model, z)[0])

    def optimize_latent(
        self, z: torch.Tensor, *, content: torch.Tensor | None = None, callback: Callback = None
    ) -> torch.Tensor:
        """Run AD's optimisation from latent `z` (content latent or noise) against the references."""
        s = self.settings
        return ad.optimize_transfer(
            self.model,
            self.references,
            self.features,
            z,
            steps=s.opt_steps,
            lr=s.opt_lr,
            content=content,
            content_weight=self.references.options.content_weight,
            callback=callback,
        )

    # --- what every output records ---------------------------------------------------------------

    def metadata(self, *, seed: int, size: tuple[int, int], source: str | None = None) -> dict:
        """Everything needed to reproduce an output, for the PNG/EXIF settings chunk.

        Only what the run used is recorded: no prompt, negative prompt or CFG for optimisation
        (it reads none of them), no negative prompt where CFG does not run, no strength or
        content weight from pure noise; the tiny VAE by the model it loaded; style references
        by their path as given and a short content hash."""
        s, m = self.settings, self.model
        sample = s.mode == "sample"
        ad_on = self.references is not None
        return {
            "prompt": s.prompt if sample else None,
            "negative_prompt": s.negative if sample and conditioning.uses_cfg(m, s.cfg) else None,
            "steps": s.steps if sample else s.opt_steps,
            "sampler": s.scheduler.upper() if sample else "AD-optimize",
            "cfg_scale": s.cfg if sample else None,
            "seed": seed,
            "size": f"{size[0]}x{size[1]}",
            "model": s.model,
            "strength": s.strength if sample and self.task != "noise" else None,
            "gamma": s.gamma if s.scheduler == "tcd" and sample else None,
            "accelerator": m.accelerator or "none",
            "loras": list(s.loras) or None,
            "style": self.style_names or None,
            "style_sha256": self.style_hashes or None,
            "style_mode": ("ad" if not sample else s.style_mode) if self.style_names else None,
            "style_scale": s.style_scale if self.cond.image_embeds is not None else None,
            "ad_iters": s.ad_iters if ad_on and sample else None,
            "ad_lr": (s.ad_lr if sample else s.opt_lr) if ad_on else None,
            "ad_adain": s.ad_adain if ad_on and sample else None,
            "content_weight": (
                self.references.options.content_weight
                if ad_on and self.task != "noise"  # from noise there is no content to keep
                else None
            ),
            "tiny_vae": True if tiny_vae(s) else None,
            "tiny_vae_model": tiny_vae_source(s, m.family),
            "vae": s.vae,
            "controls": self.control_metadata(),
            "dtype": str(m.dtype).removeprefix("torch."),
            "input": source,
            "stylekit": __version__,
        }


def folder_widths(source: str) -> tuple[int | None, int | None]:
    """The UNet's and VAE's first block widths from a local diffusers folder's configs (read
    before loading; None where unknown: a hub id or a single file is taken at full size)."""
    folder = Path(source).expanduser()
    widths = []
    for part in ("unet", "vae"):
        try:
            widths.append(first_width(json.loads((folder / part / "config.json").read_text())))
        except (OSError, ValueError):
            widths.append(None)
    return widths[0], widths[1]


def first_width(config) -> int | None:
    """`block_out_channels[0]` of a UNet or KL VAE config (mapping or diffusers config)."""
    channels = dict(config).get("block_out_channels")
    return int(channels[0]) if channels else None


def announce(model: models.LoadedModel, events: Events) -> None:
    """Tell the user what the loader chose for them (the accelerator) and what may go wrong."""
    for line in model.notices:
        events.notice(line)
    for line in model.warnings:
        events.warning(line)


class LazySession:
    """The run's session, opened once and only when there is work (`prepare` of the batch loop).

    Style references are loaded, local model paths and the schedule checked by the constructor,
    so a bad one stops the run before any model loads; `before()` is the runner's `check` (a
    size check that needs the model's family, not the model: it runs on --dry-run too);
    `check(session)` may refuse a combination only the loaded model reveals, and
    `announce(session)` returns a line for `events.notice` once the model is known (the working
    size, which depends on the model).
    """

    def __init__(
        self,
        settings: Settings,
        style: Sequence[str | Path] = (),
        *,
        runtime: Runtime | None,
        seed: int,
        events: Events,
        check: Callable[[Session], None] | None = None,
        task: str = "img2img",
        announce: Callable[[Session], str] | None = None,
        before: Callable[[], None] | None = None,
    ):
        self.settings, self.runtime = settings, runtime or Runtime()
        self.seed, self.events, self.check, self.task = seed, events, check, task
        self.announce, self.before = announce, before
        self.style_names = [str(p) for p in style]  # recorded as given, with a content hash
        self.style_images = load_style_images(style)
        self.style_hashes = [content_hash(p) for p in style]
        check_references(settings, self.style_images)
        check_sources(settings, self.runtime, self.style_images)
        check_schedule(settings, task)
        self.session: Session | None = None

    def prepare(self) -> None:
        self.events.loading(self.settings.model)
        session = open_session(
            self.settings,
            self.runtime,
            style=self.style_images,
            style_names=self.style_names,
            style_hashes=self.style_hashes,
            seed=self.seed,
            task=self.task,
        )
        announce(session.model, self.events)
        if self.check is not None:
            self.check(session)
        if self.announce is not None:
            self.events.notice(self.announce(session))
        self.session = session

    def __call__(self) -> Session:
        return self.session

    def check_input(self, work: memory.Work, *, what: str, hint: str) -> None:
        """Fail one input (InputError) whose `work` will not fit next to the loaded model."""
        check_fits(
            self.settings,
            self.runtime,
            work,
            what=what,
            hint=hint,
            model=self.session.model,
            error=InputError,
            controls=self.session.controls,
            depth_loaded=self.session._depth is not None,
        )
