"""The task functions scripts import; the CLI is a thin layer over these.

    from stylekit.api import stylize
    from stylekit.runner import Output
    report = stylize(["photos/"], style=["ref.jpg"], preset="lcm-sd15", output=Output("styled/", seed=1))

`Stylizer` is the reusable core for callers that handle their own files: the model is loaded and
the prompt and style embeddings are computed once, then any number of images go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from stylekit import __version__
from stylekit.errors import UsageError
from stylekit.media.batch import Job
from stylekit.media.images import load_image
from stylekit.presets import Settings, load_preset
from stylekit.runner import Events, Output, base_seed, plan_files, run_batched, run_jobs


@dataclass(frozen=True)
class Runtime:
    """How to run (not what): device, dtype, and loading permissions."""

    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    model_config: str | None = None  # diffusers config for a single-file checkpoint


def default_batch(runtime: Runtime) -> int:
    """Images per UNet call: 4 on a CPU (SD1.5 at 256 px: 0.41 s per image in a batch of 4 vs
    0.56 s alone, 2 threads, bf16), 2 on an accelerator, where batching gains less and memory is
    scarcer."""
    from stylekit.engine.models import resolve_device

    return 4 if resolve_device(runtime.device).type == "cpu" else 2


def resolve_settings(settings: Settings | None, preset: str | None, overrides: dict) -> Settings:
    """Defaults < preset < explicit overrides (None values mean "not given")."""
    base = settings if settings is not None else load_preset(preset)
    return base.with_overrides(**overrides)


def wants_ip_adapter(settings: Settings, style: Sequence) -> bool:
    """Whether this run injects the style references through IP-Adapter."""
    return (
        bool(style) and settings.style_mode in ("ipadapter", "both") and settings.mode == "sample"
    )


def model_spec(settings: Settings, runtime: Runtime, *, ip_adapter: bool):
    """Translate settings into what the engine loads."""
    from stylekit.engine.models import LoraSpec, ModelSpec

    return ModelSpec(
        model=settings.model,
        loras=tuple(LoraSpec.parse(s) for s in settings.loras),
        accelerator=settings.accelerator,
        strength=settings.strength,
        tiny_vae=(settings.tiny_vae_model or True) if settings.tiny_vae else False,
        ip_adapter=settings.ip_adapter if ip_adapter else None,
        image_encoder=settings.image_encoder,
        device=runtime.device,
        dtype=runtime.dtype,
        allow_pickle=runtime.allow_pickle,
        model_config=runtime.model_config,
        variant=settings.variant,
    )


def with_seed(output: Output) -> Output:
    """Fix the batch's base seed up front (random if not given) so every part of the run shares it."""
    return replace(output, seed=base_seed(output.seed))


def load_style_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """Load the style references up front, so a bad one stops the run before the model loads."""
    return [load_image(Path(p)) for p in paths]


def load_engine(settings: Settings, runtime: Runtime, *, ip_adapter: bool = False):
    """Load the model, build its sampler and encode the prompt: (model, sampler, conditioning)."""
    from stylekit.engine import conditioning, models, sampling

    model = models.load(model_spec(settings, runtime, ip_adapter=ip_adapter))
    sampler = sampling.make_sampler(
        settings.scheduler, dict(model.pipe.scheduler.config), gamma=settings.gamma
    )
    cond = conditioning.encode_text(model, settings.prompt, settings.negative, cfg=settings.cfg)
    return model, sampler, cond


class Stylizer:
    """A loaded model plus once-per-batch conditioning: call it on PIL images.

    Style references reach the model through IP-Adapter (`style_mode` ipadapter), attention
    distillation guidance (ad), or both; AD reference features are computed once per run from
    `seed` and reused for every image.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        style: Sequence[Image.Image] = (),
        runtime: Runtime = Runtime(),
        style_names: Sequence[str] = (),
        seed: int = 0,
    ):
        from stylekit.engine import conditioning
        from stylekit.engine import style as style_engine

        self.settings, self.style_names = settings, list(style_names)
        if uses_ad(settings, style) is None and settings.mode == "optimize":
            raise UsageError("--mode optimize needs at least one --style reference")
        use_ip = wants_ip_adapter(settings, style)
        self.model, self.sampler, cond = load_engine(settings, runtime, ip_adapter=use_ip)
        if use_ip:
            style_engine.set_style_scale(self.model.unet, settings.style_scale)
            cond = conditioning.with_style_images(self.model, cond, style)
        self.cond = cond
        self.guide = self.make_guide(style, seed) if uses_ad(settings, style) else None

    def make_guide(self, style: Sequence[Image.Image], seed: int):
        """AD guidance against the references (once per run: features cached per timestep)."""
        from stylekit.engine.ad import ADOptions, make_guide

        s = self.settings
        weight = s.content_weight if s.content_weight is not None else content_default(s.mode)
        options = ADOptions(
            iters=s.ad_iters,
            lr=s.ad_lr,
            adain=s.ad_adain,
            content_weight=weight,
            checkpointing=s.ad_checkpointing,
        )
        return make_guide(
            self.model,
            self.sampler,
            style,
            seed=seed,
            options=options,
            image_embeds=self.cond.image_embeds,
        )

    def __call__(
        self, image: Image.Image, *, seed: int, callback: Callable[[int, int], None] | None = None
    ) -> Image.Image:
        """Stylise one image with a CPU generator seeded once (so results match diffusers)."""
        return self.batch([image], [seed], callback=callback)[0]

    def batch(
        self,
        images: Sequence[Image.Image],
        seeds: Sequence[int],
        *,
        callback: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Stylise same-size images in one UNet batch; image i is what it would be alone with seed i."""
        from stylekit.engine.img2img import img2img
        from stylekit.engine.latents import to_pil

        s = self.settings
        if s.mode == "optimize":
            return [to_pil(self.optimize(im, callback=callback)) for im in images]
        arr = img2img(
            self.model,
            self.cond,
            self.sampler,
            list(images),
            steps=s.steps,
            strength=s.strength,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            guide=self.guide,
            callback=callback,
        )
        return [to_pil(a) for a in arr]

    def generate(
        self,
        width: int,
        height: int,
        *,
        seed: int,
        callback: Callable[[int, int], None] | None = None,
    ) -> Image.Image:
        """Text-to-image from pure noise in `steps` evaluations (AD-guided when references are set)."""
        from stylekit.engine.latents import to_pil
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
            guide=self.guide,
            callback=callback,
        )
        return to_pil(arr)

    def optimize(self, image: Image.Image, *, callback=None):
        """AD's optimisation-based transfer from the content latent (deterministic, no seed)."""
        from stylekit.engine.ad import clean_latent, optimize_transfer
        from stylekit.engine.latents import decode

        s, z = self.settings, clean_latent(self.model, image)
        weight = s.content_weight if s.content_weight is not None else content_default(s.mode)
        z = optimize_transfer(
            self.guide,
            z,
            steps=s.opt_steps,
            lr=s.opt_lr,
            content=z,
            content_weight=weight,
            callback=callback,
        )
        return decode(self.model, z)[0]

    def metadata(self, *, seed: int, size: tuple[int, int], source: str | None = None) -> dict:
        """Everything needed to reproduce an output, for the PNG/EXIF settings chunk."""
        s, m = self.settings, self.model
        ad = self.guide is not None
        return {
            "prompt": s.prompt,
            "negative_prompt": s.negative,
            "steps": s.steps if s.mode == "sample" else s.opt_steps,
            "sampler": s.scheduler.upper() if s.mode == "sample" else "AD-optimize",
            "cfg_scale": s.cfg,
            "seed": seed,
            "size": f"{size[0]}x{size[1]}",
            "model": s.model,
            "strength": s.strength if s.mode == "sample" else None,
            "gamma": s.gamma if s.scheduler == "tcd" and s.mode == "sample" else None,
            "accelerator": m.accelerator or "none",
            "loras": list(s.loras) or None,
            "style": self.style_names or None,
            "style_mode": ("ad" if s.mode == "optimize" else s.style_mode)
            if self.style_names
            else None,
            "style_scale": s.style_scale if self.cond.image_embeds is not None else None,
            "ad_iters": s.ad_iters if ad and s.mode == "sample" else None,
            "ad_lr": (s.ad_lr if s.mode == "sample" else s.opt_lr) if ad else None,
            "ad_adain": s.ad_adain if ad and s.mode == "sample" else None,
            "content_weight": self.guide.options.content_weight if ad else None,
            "tiny_vae": s.tiny_vae or None,
            "dtype": str(m.dtype).removeprefix("torch."),
            "input": source,
            "stylekit": __version__,
        }


class RunModel:
    """The run's Stylizer, built once and only when there is work (`prepare` of the batch loop).

    Style references are loaded up front by the constructor, so a bad one stops the run before any
    model loads; `check(stylizer)` may refuse a combination only the loaded model reveals.
    """

    def __init__(
        self,
        settings: Settings,
        style: Sequence[str | Path],
        *,
        runtime: Runtime | None,
        seed: int,
        events: Events,
        check: Callable[[Stylizer], None] | None = None,
    ):
        self.settings, self.runtime, self.seed, self.events = (
            settings,
            runtime or Runtime(),
            seed,
            events,
        )
        self.style_names = [Path(p).name for p in style]
        self.style_images = load_style_images(style)
        self.check = check
        self.stylizer: Stylizer | None = None

    def prepare(self) -> None:
        self.events.loading(self.settings.model)
        stylizer = Stylizer(
            self.settings,
            style=self.style_images,
            runtime=self.runtime,
            style_names=self.style_names,
            seed=self.seed,
        )
        if self.check is not None:
            self.check(stylizer)
        self.stylizer = stylizer

    def __call__(self) -> Stylizer:
        return self.stylizer


def uses_ad(settings: Settings, style: Sequence) -> bool | None:
    """Whether AD guidance runs: needs references and style mode ad/both (or optimize mode).

    Returns None when AD is asked for (optimize mode) but there is no reference.
    """
    wanted = settings.style_mode in ("ad", "both") or settings.mode == "optimize"
    if wanted and not style:
        return None if settings.mode == "optimize" else False
    return wanted


def content_default(mode: str) -> float:
    """The AD release's content weight: 0.25 for optimisation transfer, none when sampling."""
    return 0.25 if mode == "optimize" else 0.0


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
):
    """Stylise image files, folders and globs; returns a BatchReport (see `stylekit.runner`)."""
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    settings = resolve_settings(settings, preset, overrides)
    output = with_seed(output or Output())
    jobs = plan_files(list(inputs), output)
    events = events or Events()
    model = RunModel(settings, style, runtime=runtime, seed=output.seed, events=events)

    def load(job: Job) -> Image.Image:
        return load_image(job.input, size=size, max_size=max_size)

    def process(batch: list[tuple[Job, int, Image.Image]]):
        stylizer = model()
        images, seeds = [b[2] for b in batch], [b[1] for b in batch]
        outs = stylizer.batch(images, seeds, callback=events.step)
        return [
            (out, stylizer.metadata(seed=seed, size=im.size, source=job.input.name))
            for out, (job, seed, im) in zip(outs, batch, strict=True)
        ]

    return run_batched(
        jobs,
        output,
        load=load,
        process=process,
        batch_size=batch_size or default_batch(runtime),
        key=lambda im: im.size,
        prepare=model.prepare,
        events=events,
    )


def prompt_stem(prompt: str, limit: int = 40) -> str:
    """A file-name stem from a prompt: lowercase words joined by '-', at most `limit` chars."""
    words = "".join(c if c.isalnum() else " " for c in prompt.lower()).split()
    return "-".join(words)[:limit].strip("-") or "image"


def plan_generated(count: int, prompt: str, output: Output) -> list[Job]:
    """Jobs for generated images (no input file): `<prompt-stem>-NNN.<fmt>` or exactly `-o FILE`."""
    from stylekit.media.batch import DEFAULT_OUT_DIR, FORMAT_EXTS, IMAGE_EXTS, output_format

    if count < 1:
        raise UsageError(f"-n must be at least 1, got {count}")
    out = Path(output.out) if output.out is not None else DEFAULT_OUT_DIR
    if out.suffix.lower() in IMAGE_EXTS and not out.is_dir():
        if count != 1:
            raise UsageError(f"-o {out} names one file but -n is {count}")
        output_format(out.suffix)
        return [Job(None, out, Path(out.name), 0)]
    ext = FORMAT_EXTS[output_format(output.fmt)]
    stem = prompt_stem(prompt) + output.suffix
    return [
        Job(None, out / f"{stem}-{i:03d}{ext}", Path(f"{stem}-{i:03d}{ext}"), i)
        for i in range(count)
    ]


def model_size(model, size: tuple[int, int] | None) -> tuple[int, int]:
    """(W, H) to generate: the user's, else the UNet's native sample size."""
    if size is not None:
        return size
    side = model.unet.config.sample_size * 8
    return side, side


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
    max_size: int | None = None,
    events: Events | None = None,
    **overrides,
):
    """AD-guided few-step text-to-image from pure noise, in the style of the references."""
    if overrides.get("style_mode") is None:
        overrides["style_mode"] = "ad"  # the point of t2i-styled; --style-mode overrides it
    settings = resolve_settings(settings, preset, {**overrides, "prompt": prompt})
    output = with_seed(output or Output())
    jobs = plan_generated(count, prompt, output)
    events = events or Events()
    model = RunModel(settings, style, runtime=runtime, seed=output.seed, events=events)

    def process(job: Job, seed: int):
        s = model()
        width, height = model_size(s.model, size)
        image = s.generate(width, height, seed=seed, callback=events.step)
        return image, s.metadata(seed=seed, size=(width, height))

    return run_jobs(jobs, output, process, prepare=model.prepare, events=events)


def stylize_video(inputs: Sequence[str], **options):
    """Stylise videos into videos or PNG frame folders (see `stylekit.videos.stylize_video`)."""
    from stylekit.videos import stylize_video as run

    return run(inputs, **options)


from stylekit.inpainting import inpaint  # noqa: E402, F401  (re-exported tasks)
from stylekit.textures import texture, texture_expand  # noqa: E402, F401
