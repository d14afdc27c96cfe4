"""A full-resolution image as MultiDiffusion windows: what img2img, inpaint and video frames swap
in to run at any size in bounded memory (`--tiled`, docs/multidiffusion.md).

`Windows` holds the windows and the VAE's tile size, and gives the three hooks that change: the
tiled VAE encode (`tiling.encode_tiled`), ε averaged over the windows (`predict`'s noise predictor
on each window batch, with its crop of any extra input channels), and the tiled VAE decode. The
sampling loop and the draws stay those of the untiled run, so a canvas of one window is that run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stylekit.engine.conditioning import Conditioning
from stylekit.engine.controlnet import Control
from stylekit.engine.latents import to_tensor
from stylekit.engine.models import LoadedModel
from stylekit.engine.predict import EpsFn, Progress, noise_predictor
from stylekit.engine.tiling import View, crop, decode_tiled, encode_tiled, map_windows


@dataclass(frozen=True)
class Windows:
    """MultiDiffusion windows over one image's latent (`tiling.views`), ≤ `view_batch` per UNet
    call, and the VAE's tiles: about `tile` latents with `overlap` latents of context (512 px
    tiles with 128 px of context by default, the texture commands' decode tiles)."""

    views: Sequence[View]
    view_batch: int = 4
    tile: int = 64
    overlap: int = 16

    @classmethod
    def of(cls, plan) -> Windows:
        """The windows of a `tasks.textures.CanvasPlan`."""
        return cls(plan.windows(), view_batch=plan.view_batch)

    @property
    def guidance_args(self) -> dict:
        """What AD guidance needs to refine window by window (`ad.guidance`'s keywords)."""
        return {"windows": self.views, "view_batch": self.view_batch}

    def encode(self, model: LoadedModel, images, generator) -> torch.Tensor:
        """`latents.encode` of one image (or a list of one, one generator) through the tiled VAE."""
        image = images[0] if isinstance(images, (list, tuple)) else images
        gen = generator[0] if isinstance(generator, list) else generator
        return encode_tiled(model, to_tensor(image), gen, tile=self.tile, overlap=self.overlap)

    def decode(self, model: LoadedModel, z: torch.Tensor) -> np.ndarray:
        """`latents.decode` through the tiled VAE: (N, H, W, 3) floats in [0, 1]."""
        return decode_tiled(model, z, tile=self.tile, overlap=self.overlap)

    def predictor(
        self,
        model: LoadedModel,
        cond: Conditioning,
        *,
        extra: torch.Tensor | None = None,
        callback: Callable[[int, int], None] | None = None,
        steps: int = 1,
        control: Control | None = None,
    ) -> EpsFn:
        """ε over the whole latent: the UNet on ≤ `view_batch` windows a call, averaged where
        they overlap (MultiDiffusion). `extra` (1, C, h, w) extra input channels (an inpainting
        UNet's mask and masked latent) and `control`'s images are cropped like the windows. `callback(done, total)`
        counts window batches' windows over `steps` steps."""
        first = self.views[0]
        height, width = 8 * first.height, 8 * first.width
        progress = Progress(callback, steps * len(self.views))

        def one_batch(crops: torch.Tensor, batch: Sequence[View], t) -> torch.Tensor:
            rows = None if extra is None else torch.cat([crop(extra, v) for v in batch])
            own = None if control is None else control.crop(batch)
            return noise_predictor(model, cond, height, width, extra=rows, control=own)(crops, t)

        def eps(z: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
            return map_windows(
                lambda crops, batch: one_batch(crops, batch, t),
                z,
                self.views,
                view_batch=self.view_batch,
                on_batch=progress,
                pass_views=True,
            )

        return eps
