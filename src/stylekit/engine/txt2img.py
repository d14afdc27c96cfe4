"""Few-step text-to-image from pure noise, optionally AD-guided (style-specific T2I)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from stylekit.engine.conditioning import Conditioning
from stylekit.engine.controlnet import Control
from stylekit.engine.latents import decode
from stylekit.engine.models import LoadedModel
from stylekit.engine.predict import noise_predictor
from stylekit.engine.sampling import (
    Guidance,
    Sampler,
    consistency_timesteps,
    sample,
    trailing_timesteps,
)


def schedule(model: LoadedModel, steps: int) -> list[int]:
    """The full-strength schedule: the 50-point consistency grid, or trailing for turbo models."""
    return trailing_timesteps(steps) if model.turbo else consistency_timesteps(steps)


@torch.no_grad()
def txt2img(
    model: LoadedModel,
    cond: Conditioning,
    sampler: Sampler,
    width: int,
    height: int,
    *,
    steps: int,
    generator: torch.Generator,
    guidance: Guidance | None = None,
    callback: Callable[[int, int], None] | None = None,
    control: Control | None = None,
) -> np.ndarray:
    """Sample one image from noise drawn like diffusers (init sigma 1); (H, W, 3) floats in [0, 1].

    `control` (ControlNets and their images at (height, width)) adds residuals to every UNet call.
    """
    ts = schedule(model, steps)
    channels = model.unet.config.in_channels
    shape = (1, channels, height // 8, width // 8)
    z = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    control = control.scheduled(ts) if control is not None else None
    more = {"control": control} if control is not None else {}
    hook = guidance(ts, **more) if guidance is not None else None
    eps = noise_predictor(model, cond, height, width, control=control)
    z = sample(eps, z, ts, sampler, generator=generator, after_step=hook, callback=callback)
    return decode(model, z)[0]
