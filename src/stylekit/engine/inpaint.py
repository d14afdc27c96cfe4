"""Few-step inpainting: repaint the white part of a mask, keep the rest, as diffusers' inpaint pipelines do.

See docs/inpainting.md. A plain (4-channel) UNet denoises the whole latent and, after
every step, the known region is put back as the original latent re-noised to the next timestep with
the initial noise (the clean latent after the last step). A dedicated inpainting UNet (9 input
channels) is told the mask instead: its input is [latent, mask, masked-image latent]. Random draws
come in diffusers' order (image posterior, start noise, masked-image posterior, then the sampler's),
so one seed gives diffusers' image. The pixels outside the mask are pasted back afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageFilter

from stylekit.engine.conditioning import Conditioning
from stylekit.engine.controlnet import Control
from stylekit.engine.latents import decode, encode_pixels, to_tensor, upcast_needed
from stylekit.engine.models import LoadedModel
from stylekit.engine.predict import noise_predictor
from stylekit.engine.sampling import Guidance, Sampler, add_noise, img2img_schedule, sample
from stylekit.engine.tiling import encode_tiled
from stylekit.errors import UsageError

if TYPE_CHECKING:
    from stylekit.engine.windows import Windows


def binarize(mask: Image.Image) -> torch.Tensor:
    """Grey mask → (1, 1, H, W) float32 of 0/1, 1 = repaint (≥ 0.5 after /255, as diffusers' mask processor)."""
    grey = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((grey >= 0.5).astype(np.float32))[None, None]


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Downsample a pixel mask to the latent grid by nearest neighbour (each cell's top-left pixel)."""
    return F.interpolate(mask, size=latent_size)  # (1, 1, h, w)


@dataclass(frozen=True)
class InpaintLatents:
    """The start latent and what the loop needs to keep or condition on the known region."""

    z: torch.Tensor  # (1, 4, h, w) start latent
    z0: torch.Tensor | None  # clean image latent (None only for a 9-channel UNet at strength 1)
    noise: torch.Tensor  # the initial noise ε0, reused to re-noise the known region
    mask: torch.Tensor  # (1, 1, h, w) 0/1 on the latent grid, 1 = repaint
    masked: torch.Tensor | None  # (1, 4, h, w) latent of the image with the repaint region
    # zeroed (None when tiled with a 4-channel UNet, which does not use it)


def prepare_latents(
    model: LoadedModel,
    image: Image.Image,
    mask: torch.Tensor,
    t0: int | None,
    sampler: Sampler,
    generator: torch.Generator,
    *,
    windows: Windows | None = None,
) -> InpaintLatents:
    """Encode, noise and mask as diffusers' inpaint pipelines do, drawing in their order
    (image posterior, start noise, masked-image posterior); with `windows` the VAE is tiled.

    At strength 1 (`t0` is None) the start latent is pure noise and a 9-channel UNet skips encoding
    the image; a 4-channel UNet still encodes it because blending needs it. Only a 9-channel UNet
    reads the masked image: for a 4-channel one its encode is skipped, but a KL VAE's posterior
    draw is still taken, so the sampler's later draws stay diffusers'.
    """
    x = to_tensor(image).to(model.device)  # (1, 3, H, W) in [−1, 1]

    def enc(pixels: torch.Tensor) -> torch.Tensor:
        if windows is None:
            return encode_pixels(model, pixels, generator)
        return encode_tiled(model, pixels, generator, tile=windows.tile, overlap=windows.overlap)

    full = t0 is None
    z0 = None if full and model.inpainting_unet else enc(x)
    f = model.pipe.vae_scale_factor
    shape = (1, model.vae.config.latent_channels, image.height // f, image.width // f)
    noise = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    z = noise if full else add_noise(z0, noise, t0, sampler.ac)
    pixels = mask.to(model.device)
    masked = None
    if model.inpainting_unet:
        masked = enc(x * (pixels < 0.5))
    elif hasattr(model.vae, "quant_conv"):  # a KL VAE samples its posterior: one draw
        dtype = torch.float32 if upcast_needed(model) else model.vae.dtype
        randn_tensor(shape, generator=generator, device=model.device, dtype=dtype)
    small = latent_mask(pixels, shape[-2:]).to(model.dtype)
    return InpaintLatents(z, z0, noise, small, masked)


def keep_known(
    lat: InpaintLatents, ts: list[int], ac: torch.Tensor
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """After step i: x = (1 − m) · add_noise(z0, ε0, t_{i+1}) + m · x; the clean z0 after the last step."""

    def after_step(i: int, z: torch.Tensor) -> torch.Tensor:
        known = add_noise(lat.z0, lat.noise, ts[i + 1], ac) if i + 1 < len(ts) else lat.z0
        return (1 - lat.mask) * known + lat.mask * z

    return after_step


def chain(first: Callable, second: Callable) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Run two after-step hooks in turn."""
    return lambda i, z: second(i, first(i, z))


@torch.no_grad()
def inpaint(
    model: LoadedModel,
    cond: Conditioning,
    sampler: Sampler,
    image: Image.Image,
    mask: torch.Tensor,
    *,
    steps: int,
    strength: float,
    generator: torch.Generator,
    guidance: Guidance | None = None,
    callback: Callable[[int, int], None] | None = None,
    windows: Windows | None = None,
    control: Control | None = None,
) -> np.ndarray:
    """Repaint where `mask` (from `binarize`) is 1 in `steps` UNet evaluations; (H, W, 3) floats in [0, 1].

    This is the decoded image before paste-back, the image diffusers' pipeline returns. With AD
    `guidance` (4-channel UNets only) each step is refined first, then the known region put back.

    With `windows` (`img2img.Windows`) the image runs at its full size in bounded memory: tiled
    VAE encode and decode, ε averaged over the windows (a 9-channel UNet gets each window's crop
    of the mask and masked-image latent), AD refining each window; the known region is put back
    on the whole latent after every step as above. A canvas of one window is the untiled run.

    `control` (ControlNets with their maps at the image's size) adds residuals to every UNet call,
    AD's refinement passes included; the nets read the 4-channel latent, as diffusers' do.
    """
    if guidance is not None and model.inpainting_unet:
        raise UsageError("AD style guidance needs a plain 4-channel UNet, not an inpainting UNet")
    _, ts = img2img_schedule(steps, strength, turbo=model.turbo)
    t0 = None if strength >= 1.0 else ts[0]
    lat = prepare_latents(model, image, mask, t0, sampler, generator, windows=windows)
    extra = None if lat.masked is None else torch.cat([lat.mask, lat.masked], dim=1)  # (1, 5, h, w)
    control = control.scheduled(ts) if control is not None else None
    if windows is None:
        eps = noise_predictor(model, cond, image.height, image.width, extra=extra, control=control)
        tiles = {}
    else:  # progress counts windows, from the predictor
        eps = windows.predictor(
            model, cond, extra=extra, callback=callback, steps=len(ts), control=control
        )
        tiles, callback = windows.guidance_args, None
    if control is not None:
        tiles = tiles | {"control": control}
    after = None
    if not model.inpainting_unet:  # a 9-channel UNet is told the mask instead
        after = keep_known(lat, ts, sampler.ac)
        if guidance is not None:
            after = chain(guidance(ts, z0=lat.z0, noise=lat.noise, **tiles), after)
    z = sample(eps, lat.z, ts, sampler, generator=generator, after_step=after, callback=callback)
    return (decode(model, z) if windows is None else windows.decode(model, z))[0]


def grow(region: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean (H, W) region by `radius` px in every direction (square neighbourhood)."""
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        windows = sliding_window_view(np.pad(region, pad), 2 * radius + 1, axis=axis)
        region = windows.any(axis=-1)
    return region


def feather(mask: torch.Tensor, blur: int) -> np.ndarray:
    """Soften a 0/1 mask into (H, W) paste-back weights that reach at most `blur` px outside it.

    A Gaussian of σ = blur / 2, cut off beyond the mask grown by `blur` px, so every pixel farther
    than that from the repaint region keeps its input value exactly.
    """
    hard = mask[0, 0].numpy() > 0.5  # (H, W)
    if blur <= 0:
        return hard.astype(np.float32)
    grey = Image.fromarray(hard.astype(np.uint8) * 255)
    soft = np.asarray(grey.filter(ImageFilter.GaussianBlur(blur / 2)), dtype=np.float32) / 255.0
    return soft * grow(hard, blur)


Box = tuple[int, int, int, int]  # (left, top, right, bottom) in px, right and bottom exclusive


def crop_box(region: np.ndarray, padding: int, *, aspect: tuple[int, int] | None = None) -> Box:
    """The bounding box of a boolean (H, W) region grown by `padding` px on every side, within
    the image; with `aspect` (W, H) then widened or heightened towards that ratio as far as the
    image allows (A1111's "only masked" crop, `expand_crop_region`)."""
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    height, width = region.shape
    left, right = max(cols[0] - padding, 0), min(cols[-1] + 1 + padding, width)
    top, bottom = max(rows[0] - padding, 0), min(rows[-1] + 1 + padding, height)
    if aspect is not None:
        ratio = aspect[0] / aspect[1]
        if (right - left) / (bottom - top) > ratio:
            top, bottom = _widen(top, bottom, round((right - left) / ratio), height)
        else:
            left, right = _widen(left, right, round((bottom - top) * ratio), width)
    return int(left), int(top), int(right), int(bottom)


def snap_box(box: Box, size: tuple[int, int], multiple: int = 8) -> Box:
    """Widen a box so each side is a multiple of `multiple` px, within a (W, H) image; a side
    the image has no room for (the next multiple is larger than the image) is left as it is."""
    left, top, right, bottom = box
    width, height = size

    def snapped(start: int, end: int, limit: int) -> tuple[int, int]:
        length = -(-(end - start) // multiple) * multiple
        if length > limit:
            return start, end
        return _widen(start, end, length, limit)

    left, right = snapped(left, right, width)
    top, bottom = snapped(top, bottom, height)
    return int(left), int(top), int(right), int(bottom)


def _widen(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """Grow [start, end) to `length` around its centre, shifted to stay within [0, limit)."""
    grow = max(length - (end - start), 0)
    start, end = start - grow // 2, end + grow - grow // 2
    shift = max(0, -start) - max(0, end - limit)
    return max(start + shift, 0), min(end + shift, limit)


def paste_back(original: Image.Image, generated: np.ndarray, weights: np.ndarray) -> Image.Image:
    """Compose input and generated pixels by `weights` (1 = generated); weight 0 gives the input byte for byte."""
    base = np.asarray(original.convert("RGB"), dtype=np.float32)  # (H, W, 3) in 0..255
    out = base + weights[..., None] * (generated * 255.0 - base)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
