"""MultiDiffusion tiling: windows over a large latent, the averaged step loop, seamless padding, tiled decoding.

MultiDiffusion (Bar-Tal et al. 2023, arXiv 2302.08113) predicts overlapping windows of a canvas
independently and averages them at every step (docs/multidiffusion.md). Windows may
wrap around the canvas; with circular padding in the UNet and the VAE the output then tiles
seamlessly. Large latents are decoded tile by tile, each with context taken around the canvas when
it wraps, so memory stays bounded by the tile size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from stylekit.engine import memory
from stylekit.engine.latents import (
    decode,
    decode_raw,
    degenerate,
    unit_pixels,
    unscale,
    upcast_needed,
    vae_dtype,
)
from stylekit.engine.models import LoadedModel
from stylekit.engine.vae_tiles import (
    WHOLE_MID_TOKENS,
    decode_mid,
    decode_up_tiles,
    encode_down_tiles,
    encode_rest,
    encoder_splits,
    lockstep_bytes,
    splits_at_mid,
)
from stylekit.errors import StylekitError, UsageError

# --- windows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """A height × width window of a (…, H, W) canvas at (top, left); a wrapped one runs on at index 0."""

    top: int
    left: int
    height: int
    width: int


def axis_starts(size: int, *, window: int, stride: int, wrap: bool) -> tuple[list[int], int]:
    """Window starts along one axis and the window length there.

    A canvas no larger than the window gets one window of the canvas size. Otherwise windows start
    every `stride`; without wrap the last one is clamped to end at the edge, so every index is
    covered; with wrap they start at every stride step around the circle and run past the edge.
    """
    if window < 1 or not 1 <= stride <= window:
        raise UsageError(f"window {window} and stride {stride}: need 1 <= stride <= window")
    if size <= window:
        return [0], size
    if wrap:
        return list(range(0, size, stride)), window
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts, window


def views(
    h: int, w: int, *, window: int, stride: int, wrap_x: bool = False, wrap_y: bool = False
) -> list[View]:
    """All windows over an h × w latent canvas, row-major (as diffusers' panorama pipeline orders them)."""
    tops, height = axis_starts(h, window=window, stride=stride, wrap=wrap_y)
    lefts, width = axis_starts(w, window=window, stride=stride, wrap=wrap_x)
    return [View(top, left, height, width) for top in tops for left in lefts]


def _indices(start: int, length: int, size: int, device: torch.device) -> torch.Tensor:
    """Canvas indices start, start + 1, … taken modulo `size` (a wrapped window continues at 0)."""
    return (start + torch.arange(length, device=device)) % size


def crop(x: torch.Tensor, view: View) -> torch.Tensor:
    """Cut `view` out of a (…, H, W) canvas, wrapping around its edges: (…, H, W) → (…, h, w)."""
    rows = _indices(view.top, view.height, x.shape[-2], x.device)
    cols = _indices(view.left, view.width, x.shape[-1], x.device)
    return x.index_select(-2, rows).index_select(-1, cols)  # (…, h, w)


def paste_add(canvas: torch.Tensor, view: View, part: torch.Tensor) -> None:
    """Add a (…, h, w) part into `view` of a (…, H, W) canvas in place, wrapping around its edges."""
    if view.height > canvas.shape[-2] or view.width > canvas.shape[-1]:
        raise ValueError(f"{view} is larger than the canvas {tuple(canvas.shape[-2:])}")
    rows = _indices(view.top, view.height, canvas.shape[-2], canvas.device)
    cols = _indices(view.left, view.width, canvas.shape[-1], canvas.device)
    canvas[..., rows[:, None], cols] += part  # indices are distinct: no add is lost


def coverage(h: int, w: int, windows: Sequence[View]) -> torch.Tensor:
    """How many windows cover each latent position: (h, w) float32."""
    count = torch.zeros(h, w)
    for view in windows:
        paste_add(count, view, torch.ones(view.height, view.width))
    return count


# --- averaging over windows --------------------------------------------------------------------


@torch.no_grad()
def map_windows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    windows: Sequence[View],
    *,
    view_batch: int = 4,
    on_batch: Callable[[int], None] | None = None,
    pass_views: bool = False,
) -> torch.Tensor:
    """Apply `fn` to the windows of a (N, C, H, W) canvas, ≤ `view_batch` at a time, and average
    the results where windows overlap: (N, C, H, W) in z's dtype.

    `fn` maps (len(batch)·N, C, h, w) crops, window-major, to as many results of the same shape;
    with `pass_views` it is called as fn(crops, batch_views) (per-window inputs such as a label
    map's crop). `on_batch(windows_done)` follows every batch. MultiDiffusion (Bar-Tal et al. 2023) averages
    each window's ε this way (`predict.window_averaged`) and AD guidance refines each window.
    """
    if view_batch < 1:
        raise UsageError(f"view batch {view_batch} must be at least 1")
    count = coverage(*z.shape[-2:], windows).to(z.device)  # (H, W), > 0 everywhere
    value = torch.zeros_like(z, dtype=torch.float32)  # (N, C, H, W), summed in fp32
    for j in range(0, len(windows), view_batch):
        batch = windows[j : j + view_batch]
        crops = torch.cat([crop(z, v) for v in batch])  # (len(batch)·N, C, h, w)
        out = fn(crops, batch) if pass_views else fn(crops)
        for view, part in zip(batch, out.split(z.shape[0]), strict=True):
            paste_add(value, view, part.float())
        if on_batch is not None:
            on_batch(len(batch))
    return (value / count).to(z.dtype)


# --- seamless padding --------------------------------------------------------------------------


def _pad_input(
    conv: nn.Conv2d, args: tuple, *, pads: tuple[int, ...], other: str, x: bool, y: bool
):
    """Forward pre-hook: pad the conv's input circularly along the chosen axes, `other` elsewhere."""
    left, right, top, bottom = pads
    inp = F.pad(
        args[0], (left, right, 0, 0), mode="circular" if x else other
    )  # (B, C, H, W + l + r)
    inp = F.pad(inp, (0, 0, top, bottom), mode="circular" if y else other)  # (B, C, H + t + b, …)
    return (inp, *args[1:])


@contextmanager
def circular_padding(module: nn.Module, *, x: bool, y: bool) -> Iterator[None]:
    """Make every padded Conv2d of `module` pad circularly along x and/or y for the block.

    The other axis keeps the conv's own padding (zeros for every diffusers conv). Each conv's
    padding is moved into a forward pre-hook and restored, hooks removed, on exit. Padding done
    outside a Conv2d (the `F.pad` in a VAE encoder's downsampler) is left as it is.
    """
    convs = [
        m
        for m in module.modules()
        if isinstance(m, nn.Conv2d) and any(m._reversed_padding_repeated_twice)
    ]
    if not (x or y) or not convs:
        yield
        return
    saved = [(conv, conv.padding, conv.padding_mode) for conv in convs]
    handles = []
    try:
        for conv in convs:
            other = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            pads = tuple(conv._reversed_padding_repeated_twice)  # (left, right, top, bottom)
            hook = partial(_pad_input, pads=pads, other=other, x=x, y=y)
            handles.append(conv.register_forward_pre_hook(hook))
            conv.padding, conv.padding_mode = (0, 0), "zeros"
        yield
    finally:
        for handle in handles:
            handle.remove()
        for conv, padding, mode in saved:
            conv.padding, conv.padding_mode = padding, mode


# --- tiled decoding ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Span:
    """One tile along an axis: the decoded latent range (context included) and the part kept."""

    start: int  # first decoded latent index (negative or past the end when wrapping)
    length: int
    keep_offset: int  # where the kept part starts inside the decoded range
    keep: int
    fade: int  # latents cross-faded with each neighbour at both ends of the kept part
    core_offset: int  # where this tile's own latents (no neighbour has them) start in the range
    core: int

    def core_fraction(self) -> tuple[float, float]:
        """The core as fractions of the decoded range: the same at every layer's resolution."""
        return self.core_offset / self.length, (self.core_offset + self.core) / self.length


def _spans(size: int, *, tile: int, overlap: int, wrap: bool) -> list[_Span]:
    """Split an axis into ceil(size / tile) equal cores, each decoded with `overlap` latents of context.

    The kept part is the core and half the context on each side, so neighbours overlap by `overlap`
    latents and are cross-faded there; the outer half of the context is dropped. Without wrap,
    context and kept part are clamped to the canvas; with wrap they are taken around it.
    """
    n = math.ceil(size / tile)
    if n == 1:
        return [_Span(0, size, 0, size, 0, 0, size)]
    half = overlap // 2
    spans = []
    for k in range(n):
        a, b = k * size // n, (k + 1) * size // n  # the core [a, b)
        lo, hi, keep_lo, keep_hi = a - overlap, b + overlap, a - half, b + half
        if not wrap:
            lo, hi, keep_lo, keep_hi = (
                max(lo, 0),
                min(hi, size),
                max(keep_lo, 0),
                min(keep_hi, size),
            )
        spans.append(_Span(lo, hi - lo, keep_lo - lo, keep_hi - keep_lo, 2 * half, a - lo, b - a))
    return spans


def _ramp(length: int, fade: int) -> torch.Tensor:
    """Weights 1 in the middle, rising linearly over `fade` samples at both ends (never 0): (length,)."""
    j = torch.arange(length, dtype=torch.float32) + 0.5
    if fade == 0:
        return torch.ones(length)
    return torch.minimum(torch.ones(length), torch.minimum(j, length - j) / fade)


def _blend(
    images: Sequence[torch.Tensor],
    size: tuple[int, int],
    rows: list[_Span],
    cols: list[_Span],
) -> torch.Tensor:
    """Cross-fade the kept parts of the (row, col) tiles' (1, 3, h·f, w·f) images, row-major,
    into the (1, 3, H·f, W·f) image of an (H, W) latent canvas."""
    value = weight = None
    tiles = iter(images)
    for r in rows:
        for c in cols:
            img = next(tiles)
            f = img.shape[-1] // c.length  # the VAE's scale factor
            if value is None:
                value = torch.zeros(1, 3, size[0] * f, size[1] * f)
                weight = torch.zeros(size[0] * f, size[1] * f)
            kept = img[..., r.keep_offset * f :, c.keep_offset * f :][
                ..., : r.keep * f, : c.keep * f
            ]
            ramp = _ramp(r.keep * f, r.fade * f)[:, None] * _ramp(
                c.keep * f, c.fade * f
            )  # (hk, wk)
            view = View((r.start + r.keep_offset) * f, (c.start + c.keep_offset) * f, *ramp.shape)
            paste_add(value, view, kept.float() * ramp)
            paste_add(weight, view, ramp)
    return value / weight


def _views(rows: list[_Span], cols: list[_Span]) -> list[View]:
    return [View(r.start, c.start, r.length, c.length) for r in rows for c in cols]


def _decode_one(
    model: LoadedModel,
    z: torch.Tensor,
    rows: list[_Span],
    cols: list[_Span],
    dtype: torch.dtype,
    lockstep: bool,
) -> np.ndarray:
    """Decode one (1, C, h, w) latent tile by tile in `dtype`: (1, H, W, 3) in [0, 1].

    With `lockstep` (a KL VAE, mid block on the whole latent within WHOLE_MID_TOKENS, memory
    within budget) the tiles share the mid block and every GroupNorm's statistics
    (`vae_tiles`); otherwise each tile runs the whole decoder on its own.
    """
    vae, size = model.vae, tuple(z.shape[-2:])
    if lockstep:
        with vae_dtype(vae, dtype):
            h = decode_mid(vae, unscale(vae, z).to(dtype))  # (1, C', h, w)
            cores = [(*r.core_fraction(), *c.core_fraction()) for r in rows for c in cols]
            images = decode_up_tiles(vae, [crop(h, v) for v in _views(rows, cols)], cores)
            images = [unit_pixels(img).cpu() for img in images]
    else:
        images = (
            torch.from_numpy(decode_raw(model, crop(z, v), dtype)).permute(0, 3, 1, 2)
            for v in _views(rows, cols)
        )
    return _blend(images, size, rows, cols).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode_tiled(
    model: LoadedModel,
    x: torch.Tensor,
    generator: torch.Generator | None,
    *,
    tile: int = 64,
    overlap: int = 16,
    wrap_x: bool = False,
    wrap_y: bool = False,
    lockstep: bool | None = None,
) -> torch.Tensor:
    """Encode (1, 3, H, W) pixels in [−1, 1] tile by tile like the whole image: scaled latents.

    Tiles of about `tile` latents (8 px each) with `overlap` latents of context run the encoder's
    down blocks in step with shared GroupNorm statistics (`vae_tiles.encode_down_tiles`); their
    cores are put together and the mid block (attention), the output layers and the posterior
    draw run on the whole latent, which has 64 times fewer positions than the image. A KL
    posterior is sampled with `generator` as `latents.encode_pixels` does. One tile is encoded
    whole. Above WHOLE_MID_TOKENS (or with `lockstep` False), and for encoders without GroupNorm
    (TAESD), every tile runs the whole encoder alone and the cores are put together
    (`_encode_alone`): memory bounded by one tile, at the cost of per-tile statistics (none
    for TAESD, whose convolutions see only the tile's context).
    """
    from stylekit.engine.latents import encode_pixels, scale_latents

    vae = model.vae
    h, w = x.shape[-2] // 8, x.shape[-1] // 8
    rows = _spans(h, tile=tile, overlap=overlap, wrap=wrap_y)
    cols = _spans(w, tile=tile, overlap=overlap, wrap=wrap_x)
    if lockstep is None:
        lockstep = h * w <= WHOLE_MID_TOKENS
    if len(rows) * len(cols) == 1:
        return encode_pixels(model, x, generator)
    if not lockstep or not encoder_splits(vae):
        return _encode_alone(model, x, generator, rows, cols)
    dtype = torch.float32 if upcast_needed(model) else vae.dtype
    with vae_dtype(vae, dtype):
        pixels = x.to(device=model.device, dtype=dtype)
        views = [View(8 * v.top, 8 * v.left, 8 * v.height, 8 * v.width) for v in _views(rows, cols)]
        cores = [(*r.core_fraction(), *c.core_fraction()) for r in rows for c in cols]
        parts = encode_down_tiles(vae, [crop(pixels, v) for v in views], cores)
        whole = torch.zeros(1, parts[0].shape[1], h, w, dtype=parts[0].dtype, device=model.device)
        for part, r, c in zip(
            parts, (r for r in rows for _ in cols), cols * len(rows), strict=True
        ):
            core = part[
                ..., r.core_offset : r.core_offset + r.core, c.core_offset : c.core_offset + c.core
            ]
            paste_add(
                whole, View(r.start + r.core_offset, c.start + c.core_offset, r.core, c.core), core
            )
        moments = encode_rest(vae, whole)
    z = DiagonalGaussianDistribution(moments).sample(generator).to(model.dtype)
    return scale_latents(vae, z)


def _encode_alone(
    model: LoadedModel,
    x: torch.Tensor,
    generator: torch.Generator | None,
    rows: list[_Span],
    cols: list[_Span],
) -> torch.Tensor:
    """Encode (1, 3, H, W) pixels tile by tile, each tile (with its context) through the whole
    encoder alone; the tiles' cores make the posterior's moments (a KL VAE: drawn on the whole
    latent with `generator`) or the latents (TAESD). Scaled latents."""
    from stylekit.engine.latents import scale_latents

    vae = model.vae
    h, w = x.shape[-2] // 8, x.shape[-1] // 8
    dtype = torch.float32 if upcast_needed(model) else vae.dtype
    whole, kl = None, False
    with vae_dtype(vae, dtype):
        pixels = x.to(device=model.device, dtype=dtype)
        for r in rows:
            for c in cols:
                out = vae.encode(
                    crop(pixels, View(8 * r.start, 8 * c.start, 8 * r.length, 8 * c.length))
                )
                kl = hasattr(out, "latent_dist")
                part = out.latent_dist.parameters if kl else out.latents  # (1, 2C or C, h, w)
                if whole is None:
                    whole = torch.zeros(
                        1, part.shape[1], h, w, dtype=part.dtype, device=part.device
                    )
                core = part[
                    ...,
                    r.core_offset : r.core_offset + r.core,
                    c.core_offset : c.core_offset + c.core,
                ]
                paste_add(
                    whole,
                    View(r.start + r.core_offset, c.start + c.core_offset, r.core, c.core),
                    core,
                )
    z = DiagonalGaussianDistribution(whole).sample(generator) if kl else whole
    return scale_latents(vae, z.to(model.dtype))


def lockstep_fits(model: LoadedModel, height: int, width: int) -> bool:
    """Whether the tiles of an (height, width) latent can share the mid block and GroupNorm
    statistics: a KL VAE, the mid block within WHOLE_MID_TOKENS, and the tiles' activations at
    one layer within half the memory free now."""
    vae = model.vae
    if not splits_at_mid(vae) or height * width > WHOLE_MID_TOKENS:
        return False
    return lockstep_bytes(vae, height, width) <= free_memory(model.device) // 2


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now (`memory.available`; 0 where unknown)."""
    return memory.available(device) or 0


@torch.no_grad()
def decode_tiled(
    model: LoadedModel,
    z: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int = 16,
    wrap_x: bool = False,
    wrap_y: bool = False,
    lockstep: bool | None = None,
) -> np.ndarray:
    """Decode a scaled (N, 4, H, W) latent tile by tile: (N, 8H, 8W, 3) floats in [0, 1].

    Tiles of about `tile` latents are decoded with `overlap` latents of context on every side,
    taken around the canvas along wrapped axes (so a seamless latent decodes seamlessly) and
    clamped at the edges otherwise; neighbours are cross-faded over `overlap` latents. Memory is
    bounded by (tile + 2 overlap)² latents. Falls back to fp32 like `latents.decode`.

    A KL VAE's tiles share the mid block (run on the whole latent) and every GroupNorm's
    statistics (`vae_tiles.decode_up_tiles`), so they agree in colour and contrast with each other
    and with the whole decode, when `lockstep_fits` (or `lockstep` says so); otherwise, and for
    decoders without GroupNorm (TAESD), each tile is decoded alone. Rows of the batch are decoded
    one after the other.
    """
    if tile < 1 or not 0 <= 2 * overlap < tile:
        raise UsageError(f"tile {tile} and overlap {overlap}: need 0 <= 2 * overlap < tile")
    rows = _spans(z.shape[-2], tile=tile, overlap=overlap, wrap=wrap_y)
    cols = _spans(z.shape[-1], tile=tile, overlap=overlap, wrap=wrap_x)
    if len(rows) * len(cols) == 1:  # one tile is the whole latent: decode it as such
        return decode(model, z)
    dtype = torch.float32 if upcast_needed(model) else model.vae.dtype

    shared = lockstep_fits(model, *z.shape[-2:]) if lockstep is None else lockstep

    def run(dtype: torch.dtype) -> np.ndarray:
        rows_of_batch = [
            _decode_one(model, z[i : i + 1], rows, cols, dtype, shared) for i in range(len(z))
        ]
        return np.concatenate(rows_of_batch)

    arr = run(dtype)
    if degenerate(arr) and dtype != torch.float32:
        arr = run(torch.float32)
    reason = degenerate(arr)
    if reason:
        raise StylekitError(f"decoded image is {reason} even in fp32 (the model produced no image)")
    return arr
