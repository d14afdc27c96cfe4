"""The task functions scripts import; the CLI is a thin layer over these.

    from stylekit.api import stylize
    report = stylize(["photos/"], style=["ref.jpg"], preset="lcm-sd15", out="styled/", seed=1)

`Stylizer` is the reusable core for callers that handle their own files: the model is loaded and
the prompt and style embeddings are computed once, then any number of images go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from stylekit import __version__
from stylekit.errors import UsageError
from stylekit.media.batch import Job
from stylekit.media.images import load_image
from stylekit.presets import Settings, load_preset
from stylekit.runner import Events, Output, plan_files, run_jobs


@dataclass(frozen=True)
class Runtime:
    """How to run (not what): device, dtype, and loading permissions."""

    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    model_config: str | None = None  # diffusers config for a single-file checkpoint


def resolve_settings(settings: Settings | None, preset: str | None, overrides: dict) -> Settings:
    """Defaults < preset < explicit overrides (None values mean "not given")."""
    base = settings if settings is not None else load_preset(preset)
    return base.with_overrides(**overrides)


def wants_ip_adapter(settings: Settings, style: Sequence) -> bool:
    """Whether this run injects the style references through IP-Adapter."""
    return bool(style) and settings.style_mode in ("ipadapter", "both")


def model_spec(settings: Settings, runtime: Runtime, *, ip_adapter: bool):
    """Translate settings into what the engine loads."""
    from stylekit.engine.models import LoraSpec, ModelSpec

    return ModelSpec(
        model=settings.model,
        loras=tuple(LoraSpec.parse(s) for s in settings.loras),
        accelerator=settings.accelerator,
        strength=settings.strength,
        tiny_vae=settings.tiny_vae,
        ip_adapter=settings.ip_adapter if ip_adapter else None,
        image_encoder=settings.image_encoder,
        device=runtime.device,
        dtype=runtime.dtype,
        allow_pickle=runtime.allow_pickle,
        model_config=runtime.model_config,
        variant=settings.variant,
    )


def load_style_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """Load the style references up front, so a bad one stops the run before the model loads."""
    return [load_image(Path(p)) for p in paths]


class Stylizer:
    """A loaded model plus once-per-batch conditioning: call it on PIL images."""

    def __init__(
        self,
        settings: Settings,
        *,
        style: Sequence[Image.Image] = (),
        runtime: Runtime = Runtime(),
        style_names: Sequence[str] = (),
    ):
        from stylekit.engine import conditioning, models, sampling
        from stylekit.engine import style as style_engine

        if settings.style_mode in ("ad", "both"):
            raise UsageError("--style-mode ad/both needs attention distillation, not in this build")
        self.settings, self.style_names = settings, list(style_names)
        use_ip = wants_ip_adapter(settings, style)
        self.model = models.load(model_spec(settings, runtime, ip_adapter=use_ip))
        self.sampler = sampling.make_sampler(
            settings.scheduler, dict(self.model.pipe.scheduler.config), gamma=settings.gamma
        )
        cond = conditioning.encode_text(
            self.model, settings.prompt, settings.negative, cfg=settings.cfg
        )
        if use_ip:
            style_engine.set_style_scale(self.model.unet, settings.style_scale)
            cond = conditioning.with_style_images(self.model, cond, style)
        self.cond = cond

    def __call__(
        self, image: Image.Image, *, seed: int, callback: Callable[[int, int], None] | None = None
    ) -> Image.Image:
        """Stylise one image with a CPU generator seeded once (so results match diffusers)."""
        from stylekit.engine.img2img import img2img
        from stylekit.engine.latents import to_pil

        s = self.settings
        arr = img2img(
            self.model,
            self.cond,
            self.sampler,
            image,
            steps=s.steps,
            strength=s.strength,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback=callback,
        )
        return to_pil(arr)

    def metadata(self, *, seed: int, size: tuple[int, int], source: str | None = None) -> dict:
        """Everything needed to reproduce an output, for the PNG/EXIF settings chunk."""
        s, m = self.settings, self.model
        return {
            "prompt": s.prompt,
            "negative_prompt": s.negative,
            "steps": s.steps,
            "sampler": s.scheduler.upper(),
            "cfg_scale": s.cfg,
            "seed": seed,
            "size": f"{size[0]}x{size[1]}",
            "model": s.model,
            "strength": s.strength,
            "gamma": s.gamma if s.scheduler == "tcd" else None,
            "accelerator": m.accelerator or "none",
            "loras": list(s.loras) or None,
            "style": self.style_names or None,
            "style_mode": s.style_mode if self.style_names else None,
            "style_scale": s.style_scale if self.style_names else None,
            "tiny_vae": s.tiny_vae or None,
            "dtype": str(m.dtype).removeprefix("torch."),
            "input": source,
            "stylekit": __version__,
        }


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
    events: Events | None = None,
    **overrides,
):
    """Stylise image files, folders and globs; returns a BatchReport (see `stylekit.runner`)."""
    settings = resolve_settings(settings, preset, overrides)
    output = output or Output()
    jobs = plan_files(list(inputs), output)
    style_images = load_style_images(style)
    state: dict[str, Stylizer] = {}
    events = events or Events()

    def prepare() -> None:
        events.loading(settings.model)
        state["s"] = Stylizer(
            settings, style=style_images, runtime=runtime, style_names=[Path(p).name for p in style]
        )

    def process(job: Job, seed: int):
        image = load_image(job.input, size=size, max_size=max_size)
        stylizer = state["s"]
        out = stylizer(image, seed=seed, callback=events.step)
        return out, stylizer.metadata(seed=seed, size=image.size, source=job.input.name)

    return run_jobs(jobs, output, process, prepare=prepare, events=events)
