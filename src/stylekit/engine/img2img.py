"""Few-step image-to-image from a partially noised content image (STD / TCD / LCM / turbo)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from stylekit.engine.conditioning import Conditioning
from stylekit.engine.latents import decode, encode, to_tensor
from stylekit.engine.models import LoadedModel
from stylekit.engine.predict import noise_predictor, window_averaged
from stylekit.engine.sampling import Guidance, Sampler, add_noise, img2img_schedule, sample
from stylekit.engine.tiling import View, decode_tiled, encode_tiled
from stylekit.errors import UsageError


@dataclass(frozen=True)
class Windows:
    """MultiDiffusion windows over one image's latent (`tiling.views`), ≤ `view_batch` per UNet
    call, and the VAE's tiles: about `tile` latents with `overlap` latents of context (512 px
    tiles with 128 px of context by default, the texture commands' decode tiles)."""

    views: Sequence[View]
    view_batch: int = 4
    tile: int = 64
    overlap: int = 16

    def fits_one_tile(self, height: int, width: int) -> bool:
        """Whether an (height, width) latent is one VAE tile: then the VAE runs on it whole."""
        return height <= self.tile and width <= self.tile


def start_latent(
    model: LoadedModel, images, t0: int, sampler: Sampler, generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode and noise the content image(s) to t0: returns (z_t0, z0, ε), drawing like diffusers.

    `images` is one image or a list of same-size images with one generator each.
    """
    z0 = encode(model, images, generator)
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
    """
    if windows is not None:
        return _tiled(
            model, cond, sampler, images, steps, strength, generator, guidance, callback, windows
        )
    first = images[0] if isinstance(images, (list, tuple)) else images
    _, ts = img2img_schedule(steps, strength, turbo=model.turbo)
    z, z0, noise = start_latent(model, images, ts[0], sampler, generator)
    hook = guidance(ts, z0=z0, noise=noise) if guidance is not None else None
    eps = noise_predictor(model, cond, first.height, first.width)
    z = sample(eps, z, ts, sampler, generator=generator, after_step=hook, callback=callback)
    return decode(model, z)


def _tiled(
    model: LoadedModel,
    cond: Conditioning,
    sampler: Sampler,
    images: Image.Image | list[Image.Image],
    steps: int,
    strength: float,
    generator: torch.Generator | list[torch.Generator],
    guidance: Guidance | None,
    callback: Callable[[int, int], None] | None,
    windows: Windows,
) -> np.ndarray:
    """`img2img` over MultiDiffusion windows: the same schedule, draws and loop, other hooks."""
    if isinstance(images, (list, tuple)):
        if len(images) != 1:
            raise UsageError(f"tiled image-to-image runs one image at a time, got {len(images)}")
        images = images[0]
    gens = generator if isinstance(generator, list) else [generator]
    if len(gens) != 1:
        raise UsageError(f"tiled image-to-image takes one generator, got {len(gens)}")
    h, w = images.height // 8, images.width // 8
    whole = windows.fits_one_tile(h, w)
    _, ts = img2img_schedule(steps, strength, turbo=model.turbo)
    if whole:
        z0 = encode(model, [images], gens)
    else:
        z0 = encode_tiled(
            model, to_tensor(images), gens[0], tile=windows.tile, overlap=windows.overlap
        )
    noise = randn_tensor(z0.shape, generator=gens, device=z0.device, dtype=z0.dtype)
    z = add_noise(z0, noise, ts[0], sampler.ac)
    hook = None
    if guidance is not None:
        hook = guidance(
            ts, z0=z0, noise=noise, windows=windows.views, view_batch=windows.view_batch
        )
    first = windows.views[0]
    unet_eps = noise_predictor(model, cond, 8 * first.height, 8 * first.width)
    eps = window_averaged(
        unet_eps, windows.views, view_batch=windows.view_batch, callback=callback, steps=len(ts)
    )
    z = sample(eps, z, ts, sampler, generator=gens, after_step=hook)
    if whole:
        return decode(model, z)
    return decode_tiled(model, z, tile=windows.tile, overlap=windows.overlap)
