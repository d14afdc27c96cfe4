"""ε-prediction callables `eps(z, t)`: the hook of the one sampling loop where everything that
changes how the noise is predicted composes: classifier-free guidance, extra input channels
(inpainting UNets), ControlNet residuals, and MultiDiffusion's window averaging. See docs/sampling.md and
docs/multidiffusion.md. "ε" stands for whatever the UNet outputs (ε, v or x0 by its prediction type):
everything composed here is linear in that output, so it is the same for all three.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from stylekit.engine.conditioning import Conditioning, added_kwargs
from stylekit.engine.controlnet import Control
from stylekit.engine.models import LoadedModel
from stylekit.engine.sampling import AfterStep, Sampler, sample
from stylekit.engine.tiling import View, map_windows, views

EpsFn = Callable[[torch.Tensor, int | torch.Tensor], torch.Tensor]


def noise_predictor(
    model: LoadedModel,
    cond: Conditioning,
    height: int,
    width: int,
    *,
    extra: torch.Tensor | None = None,
    control: Control | None = None,
) -> Callable[[torch.Tensor, int | torch.Tensor], torch.Tensor]:
    """Return eps(z, t): one UNet call on [z, z] under CFG, combined as e_u + g (e_c − e_u).

    `t` is one timestep or one per latent row (stream batch). `extra` (1, C, h, w) is concatenated
    to every latent as more input channels (an inpainting UNet's mask and masked-image latent).
    `control` (ControlNets with one conditioning image per latent row, or one for all) adds its
    residuals to the UNet's skips; the nets see the same rows, timesteps and text as the UNet.
    """
    added = added_kwargs(model, cond, height, width)
    unet = model.unet

    def eps(z: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        latent = torch.cat([z, z]) if cond.do_cfg else z  # (2B, 4, h, w): the ControlNets' rows
        if extra is not None:
            z = torch.cat([z, extra.expand(batch, -1, -1, -1)], dim=1)  # (B, 4 + C, h, w)
        rows = torch.cat([z, z]) if cond.do_cfg else z  # (2B, ·, h, w) under CFG, uncond first
        t = torch.as_tensor(t, device=z.device)
        if t.ndim and cond.do_cfg:
            t = torch.cat([t, t])  # (2B,) per-row timesteps follow their rows
        hidden, more = expand(cond.prompt_embeds, batch), expand_added(added, batch)
        residuals = {} if control is None else control.residuals(latent, t, hidden, more)
        out = unet(
            rows,
            t,
            encoder_hidden_states=hidden,
            timestep_cond=cond.timestep_cond,
            added_cond_kwargs=more,
            return_dict=False,
            **residuals,
        )[0]
        if not cond.do_cfg:
            return out
        e_u, e_c = out.chunk(2)
        return e_u + cond.cfg * (e_c - e_u)

    return eps


def expand(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat each conditioning row for a latent batch: (R, ...) → (R·batch, ...), rows kept in order."""
    return rows if batch == 1 else rows.repeat_interleave(batch, dim=0)


def expand_added(added: dict | None, batch: int) -> dict | None:
    """Expand every tensor of added_cond_kwargs like `expand` (lists of IP embeds included)."""
    if added is None or batch == 1:
        return added
    return {
        k: [expand(e, batch) for e in v] if isinstance(v, list) else expand(v, batch)
        for k, v in added.items()
    }


def window_averaged(
    eps_fn: EpsFn,
    windows: Sequence[View],
    *,
    view_batch: int = 4,
    callback: Callable[[int, int], None] | None = None,
    steps: int = 1,
) -> EpsFn:
    """MultiDiffusion as ε prediction: every window's ε, ≤ `view_batch` windows per UNet call,
    averaged where windows overlap (wrapping around the canvas like the windows do).

    TCD and LCM steps are affine in (z, ε) (as in (z, v) or (z, x0)) with per-timestep coefficients, so stepping the canvas
    with the averaged ε equals averaging the separately stepped windows (Bar-Tal et al. 2023).
    `callback(done, steps · len(windows))` follows every batch of windows.
    """
    progress = Progress(callback, steps * len(windows))

    def eps(z: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        return map_windows(
            lambda crops: eps_fn(crops, t), z, windows, view_batch=view_batch, on_batch=progress
        )

    return eps


class Progress:
    """Count work done across calls and report `callback(done, total)`."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, count: int) -> None:
        self.done += count
        if self.callback is not None:
            self.callback(self.done, self.total)


def multidiffusion(
    eps_fn: EpsFn,
    z: torch.Tensor,
    ts: Sequence[int],
    sampler: Sampler,
    *,
    window: int = 64,
    stride: int = 8,
    view_batch: int = 4,
    generator: torch.Generator | None = None,
    wrap_x: bool = False,
    wrap_y: bool = False,
    after_step: AfterStep | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise a (N, C, H, W) canvas with the one sampling loop and window-averaged ε.

    Window 64 and stride 8 latents are the panorama pipeline's (512 px windows for SD1.5). When the
    sampler re-noises (LCM, TCD γ > 0) one noise is drawn for the whole canvas per step: averaging
    independent per-window noises would shrink it. `callback(done, total)` counts windows.

    Seamless output: along a wrapped axis longer than the window the wrapped windows alone make
    the result periodic; along one that fits in a single window the UNet needs `circular_padding`.
    Either way the VAE needs it too (and `decode_tiled` with the same wrap).
    """
    h, w = z.shape[-2:]
    windows = views(h, w, window=window, stride=stride, wrap_x=wrap_x, wrap_y=wrap_y)
    eps = window_averaged(eps_fn, windows, view_batch=view_batch, callback=callback, steps=len(ts))
    with torch.no_grad():
        return sample(eps, z, ts, sampler, generator=generator, after_step=after_step)
