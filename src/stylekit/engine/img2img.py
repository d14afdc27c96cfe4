"""Few-step image-to-image from a partially noised content image (STD / TCD / LCM / turbo)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from stylekit.engine.conditioning import Conditioning
from stylekit.engine.controlnet import Control
from stylekit.engine.latents import decode, encode
from stylekit.engine.models import LoadedModel
from stylekit.engine.predict import noise_predictor
from stylekit.engine.sampling import Guidance, Sampler, add_noise, img2img_schedule, sample
from stylekit.engine.windows import Windows
from stylekit.errors import UsageError


def start_latent(
    model: LoadedModel, images, t0: int, sampler: Sampler, generator, *, encoder=encode
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode and noise the content image(s) to t0: returns (z_t0, z0, ε), drawing like diffusers.

    `images` is one image or a list of same-size images with one generator each; `encoder`
    is `latents.encode` or a `Windows`' tiled one.
    """
    z0 = encoder(model, images, generator)
    noise = randn_tensor(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    return add_noise(z0, noise, t0, sampler.ac), z0, noise


@torch.no_grad()
def img2img(
    model: LoadedModel,
    cond: Conditioning,
    sampler: Sampler,
    images: Image.Image | list[Image.Image],
    *,
    steps: int,
    strength: float,
    generator: torch.Generator | list[torch.Generator],
    guidance: Guidance | None = None,
    callback: Callable[[int, int], None] | None = None,
    windows: Windows | None = None,
    control: Control | None = None,
) -> np.ndarray:
    """Stylise images in `steps` UNet evaluations at `strength`: (B, H, W, 3) floats in [0, 1].

    A list of same-size images runs as one UNet batch, each image with its own generator, so
    every image comes out as it would alone. With `guidance` (AD), every step is followed by
    attention-distillation refinement.

    With `windows` (one image) the image runs at its full size in bounded memory: tiled VAE
    encode and decode (`tiling.encode_tiled`, `decode_tiled`), ε averaged over the windows
    (MultiDiffusion, `predict.window_averaged`) and AD, when on, refining each window
    (`guidance(..., windows=, view_batch=)`). Start noise and posterior draw come from the
    generator for the whole latent as above, so a canvas of one window is the untiled run.

    `control` (ControlNets and their images at the images' size) adds residuals to every UNet
    call over the steps actually run, AD's refinement passes included.
    """
    if windows is not None:
        _check_one(images, generator)
    first = images[0] if isinstance(images, (list, tuple)) else images
    _, ts = img2img_schedule(steps, strength, turbo=model.turbo)
    encoder = encode if windows is None else windows.encode
    z, z0, noise = start_latent(model, images, ts[0], sampler, generator, encoder=encoder)
    control = control.scheduled(ts) if control is not None else None
    if windows is None:
        eps = noise_predictor(model, cond, first.height, first.width, control=control)
        tiles = {}
    else:  # progress counts windows, from the predictor
        eps = windows.predictor(model, cond, callback=callback, steps=len(ts), control=control)
        tiles, callback = windows.guidance_args, None
    more = {"control": control} if control is not None else {}
    hook = guidance(ts, z0=z0, noise=noise, **tiles, **more) if guidance is not None else None
    z = sample(eps, z, ts, sampler, generator=generator, after_step=hook, callback=callback)
    return decode(model, z) if windows is None else windows.decode(model, z)


def _check_one(images, generator) -> None:
    """Tiled image-to-image runs one image (the windows are its batch), with one generator."""
    count = len(images) if isinstance(images, (list, tuple)) else 1
    gens = len(generator) if isinstance(generator, list) else 1
    if count != 1 or gens != 1:
        raise UsageError(
            f"tiled image-to-image runs one image at a time, got {count} ({gens} seeds)"
        )
