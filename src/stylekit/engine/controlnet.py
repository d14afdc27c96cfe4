"""ControlNet residuals for the ε-prediction hook (Zhang et al. 2023, arXiv 2302.05543).

A ControlNet is a trainable copy of the UNet's encoder that reads a conditioning image (edges,
depth, the image itself) and returns one residual per UNet skip connection plus one for the
middle block; the UNet adds them to its own. `Control` holds the nets of a run with their
conditioning images and gives `residuals(rows, t, ...)`, the UNet keywords `noise_predictor`
adds to every call, so CFG, stream stages, MultiDiffusion windows, inpainting and AD refinement
all see the same residuals. See docs/controlnet.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from stylekit.engine.tiling import View, crop


def keep_factors(steps: int, start: float, end: float) -> list[float]:
    """1 where step i of `steps` lies in [start, end] as fractions of the steps, else 0: step i
    is dropped when i/N < start or (i+1)/N > end (diffusers' rule; granularity 1/N)."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def image_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Conditioning images as (B, 3, H, W) floats in [0, 1] (RGB, not normalised to [-1, 1])."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)  # (B, H, W, 3) → (B, 3, H, W)


def rows_of(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat a batch (B, ...) to `rows` rows: [x, x] for CFG's [uncond, cond] halves, or one
    row for all."""
    return x if x.shape[0] == rows else x.repeat(rows // x.shape[0], *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class Control:
    """ControlNets with their conditioning images and scales, and when the residuals apply.

    `images[k]` is net k's (B or 1, 3, H, W) image at the latent's pixel size; `keep` maps each
    timestep of the trajectory to its keep factor (`keep_factors`; None: always on).
    """

    nets: tuple
    images: tuple[torch.Tensor, ...]
    scales: tuple[float, ...]
    start: float = 0.0
    end: float = 1.0
    keep: dict[int, float] | None = None

    def scheduled(self, ts: Sequence[int]) -> Control:
        """This control over the trajectory `ts` (the steps actually run)."""
        factors = keep_factors(len(ts), self.start, self.end)
        return replace(self, keep={int(t): k for t, k in zip(ts, factors, strict=True)})

    def factor(self, t: int) -> float:
        """The keep factor at timestep t; one off the trajectory (AD's t' after the last step, 0)
        takes the nearest step's."""
        if self.keep is None:
            return 1.0
        t = int(t)
        if t in self.keep:
            return self.keep[t]
        return self.keep[min(self.keep, key=lambda s: abs(s - t))]

    def crop(self, views: Sequence[View]) -> Control:
        """The images' crops under latent `views` (×8 in pixels), one row per view."""
        scaled = [View(8 * v.top, 8 * v.left, 8 * v.height, 8 * v.width) for v in views]
        images = tuple(torch.cat([crop(im, v) for v in scaled]) for im in self.images)
        return replace(self, images=images)

    def select(self, index: Sequence[int]) -> Control:
        """Rows `index` of every image (a stream's frames in flight)."""
        return replace(self, images=tuple(im[list(index)] for im in self.images))

    def residuals(
        self, rows: torch.Tensor, t: int | torch.Tensor, hidden: torch.Tensor, added: dict | None
    ) -> dict:
        """The UNet keywords adding every net's residuals for latent `rows` at timestep `t`
        (one, or one per row), summed over the nets; {} when no net applies at `t`.

        A scalar `t` multiplies the residuals by one float scale as diffusers does; per-row
        timesteps (stream batch) scale each row by its own step's factor.
        """
        per_row = torch.as_tensor(t).ndim > 0
        factors = [self.factor(x) for x in torch.as_tensor(t).reshape(-1).tolist()]
        if not any(factors):
            return {}
        down, mid = None, None
        for net, image, scale in zip(self.nets, self.images, self.scales, strict=True):
            cond = rows_of(image, rows.shape[0]).to(rows.device, net.dtype)
            d, m = net(
                rows.to(net.dtype),
                t,
                encoder_hidden_states=hidden,
                controlnet_cond=cond,
                conditioning_scale=1.0 if per_row else scale * factors[0],
                added_cond_kwargs=added,
                return_dict=False,
            )
            if per_row:
                w = torch.tensor([scale * f for f in factors], device=rows.device, dtype=m.dtype)
                w = rows_of(w, rows.shape[0])[:, None, None, None]  # (rows, 1, 1, 1)
                d, m = [r * w for r in d], m * w
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
