"""Few-step image-to-image from a partially noised content image (STD / TCD / LCM / turbo)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from stylekit.engine.ad import Guide
from stylekit.engine.conditioning import Conditioning, noise_predictor
from stylekit.engine.latents import decode, encode
from stylekit.engine.models import LoadedModel
from stylekit.engine.sampling import Sampler, add_noise, img2img_schedule, sample


def start_latent(
    model: LoadedModel, image: Image.Image, t0: int, sampler: Sampler, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode and noise the content image to t0: returns (z_t0, z0, ε), drawing like diffusers."""
    z0 = encode(model, image, generator)
    noise = randn_tensor(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    return add_noise(z0, noise, t0, sampler.ac), z0, noise


@torch.no_grad()
def img2img(
    model: LoadedModel,
    cond: Conditioning,
    sampler: Sampler,
    image: Image.Image,
    *,
    steps: int,
    strength: float,
    generator: torch.Generator,
    guide: Guide | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Stylise one image in `steps` UNet evaluations at `strength`; returns (H, W, 3) floats in [0, 1].

    With an AD `guide`, every step is followed by attention-distillation refinement.
    """
    _, ts = img2img_schedule(steps, strength, turbo=model.turbo)
    z, z0, noise = start_latent(model, image, ts[0], sampler, generator)
    hook = guide.after_step(ts, z0=z0, noise=noise) if guide is not None else None
    eps = noise_predictor(model, cond, image.height, image.width)
    z = sample(eps, z, ts, sampler, generator=generator, after_step=hook, callback=callback)
    return decode(model, z)[0]
