"""ε-prediction callables `eps(z, t)`: the hook of the one sampling loop where everything that
changes how the noise is predicted composes: classifier-free guidance, extra input channels
(inpainting UNets), ControlNet residuals, and MultiDiffusion's window averaging. See docs/sampling.md and
docs/multidiffusion.md. "ε" stands for whatever the UNet outputs (ε, v or x0 by its prediction type):
everything composed here is linear in that output, so it is the same for all three.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stylekit.engine.conditioning import Conditioning, added_kwargs
from stylekit.engine.controlnet import Control
from stylekit.engine.models import LoadedModel
from stylekit.engine.sampling import AfterStep, Sampler, sample, split_output
from stylekit.engine.tiling import View, map_windows, views
from stylekit.errors import UsageError

EpsFn = Callable[[torch.Tensor, int | torch.Tensor], torch.Tensor]


CFG_MODES = ("full", "self", "initialize", "none")  # StreamDiffusion's cfg_type values


@dataclass
class Residual:
    """Residual CFG's state for one call's latents (StreamDiffusion's stock noise, closed form).

    `ref` (B, C, h, w) is each latent's reference clean latent: the frame's own encoded latent
    (`self`), or after an `initialize` stage the clean estimate of the real unconditional pass,
    which the predictor writes back into `ref` for the rows in `real`.
    """

    ref: torch.Tensor
    real: tuple[bool, ...] = ()  # rows whose unconditional ε is predicted for real

    def uncond_rows(self) -> list[int]:
        return [j for j, real in enumerate(self.real) if real]


def cfg_rows(batch: int, cond: Conditioning, mode: str = "full", real: Sequence[bool] = ()):
    """The UNet rows of one call as (latent index, conditioning row), uncond rows first.

    Conditioning row 0 is the unconditional one under CFG. `full`: every latent twice (2B rows);
    `self` and `none`: only the conditional rows (B); `initialize`: B plus the `real` latents' uncond.
    """
    if not cond.do_cfg:
        return [(j, 0) for j in range(batch)]
    uncond = {"full": range(batch), "initialize": [j for j, r in enumerate(real) if r]}
    return [(j, 0) for j in uncond.get(mode, ())] + [(j, 1) for j in range(batch)]


def noise_predictor(
    model: LoadedModel,
    cond: Conditioning,
    height: int,
    width: int,
    *,
    extra: torch.Tensor | None = None,
    control: Control | None = None,
    cfg_mode: str = "full",
    sampler: Sampler | None = None,
    delta: float = 1.0,
) -> Callable[..., torch.Tensor]:
    """Return eps(z, t, residual=None): the UNet under classifier-free guidance, e_u + g (e_c − e_u).

    `t` is one timestep or one per latent row (stream batch). `extra` (1, C, h, w) is concatenated
    to every latent as more input channels (an inpainting UNet's mask and masked-image latent).
    `control` (ControlNets with one conditioning image per latent, or one for all) adds its
    residuals to the UNet's skips; the nets see the same rows, timesteps and text as the UNet.
    `cfg_mode` (StreamDiffusion, docs/video.md): `full` runs an unconditional row per latent;
    `none` guides nothing (g = 1); `self` and `initialize` take e_u = δ · ε̄ from the residual noise
    ε̄ = (z − √ā ref) / √(1 − ā) of `residual` (which they need, and `sampler` for ā), and
    `initialize` predicts e_u for real on the rows `residual.real` marks.
    """
    if cfg_mode not in CFG_MODES:
        raise UsageError(f"unknown cfg mode {cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")
    added = added_kwargs(model, cond, height, width)
    unet = model.unet

    def eps(z: torch.Tensor, t: int | torch.Tensor, residual: Residual | None = None):
        batch = z.shape[0]
        plain = z  # (B, 4, h, w): without the extra channels
        if extra is not None:
            z = torch.cat([z, extra.expand(batch, -1, -1, -1)], dim=1)  # (B, 4 + C, h, w)
        real = residual.real if residual is not None else ()
        plan = cfg_rows(batch, cond, cfg_mode, real)
        latent, kind = (torch.tensor(x, device=z.device) for x in zip(*plan, strict=True))
        t = torch.as_tensor(t, device=z.device)
        t_rows = t[latent] if t.ndim else t  # per-row timesteps follow their rows
        hidden, more = cond.prompt_embeds[kind], pick_added(added, kind)
        residuals = {}
        if control is not None:  # the nets read the 4-channel latent of every UNet row
            residuals = control.for_rows(latent).residuals(plain[latent], t_rows, hidden, more)
        out = unet(
            z[latent],  # (R, ·, h, w): R = len(plan), uncond rows first
            t_rows,
            encoder_hidden_states=hidden,
            timestep_cond=cond.timestep_cond,
            added_cond_kwargs=more,
            return_dict=False,
            **residuals,
        )[0]
        if not cond.do_cfg:
            return out
        e_c, e_u = out[-batch:], out[:-batch]  # (B, ...) conditional, (R − B, ...) uncond
        if cfg_mode == "none":
            return e_c
        if cfg_mode != "full":
            e_u = residual_uncond(z[:, : e_c.shape[1]], t, e_u, residual, sampler, delta)
        return e_u + cond.cfg * (e_c - e_u)

    return eps


def residual_uncond(z, t, real_uncond, residual: Residual | None, sampler, delta: float):
    """The unconditional output of every row: δ · ε̄ in the model's parameterisation, or the real
    one for `residual.real` rows (whose clean estimate becomes their `ref`)."""
    if residual is None or sampler is None:
        raise ValueError("cfg modes self and initialize need a Residual and the sampler")
    a = sampler.ac.to(z.device)[torch.as_tensor(t, device=z.device).long()]
    a = a.to(z.dtype).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1): ā of each row
    rows, ref = residual.uncond_rows(), residual.ref.clone()
    if rows:
        a_real = a[rows] if a.shape[0] > 1 else a
        ref[rows] = split_output(real_uncond, z[rows], a_real, sampler.prediction)[0]
        residual.ref = ref
    stock = (z - a.sqrt() * ref) / (1 - a).sqrt()  # ε̄: the noise z carries over ref
    e_u = output_from_eps(delta * stock, z, a, sampler.prediction)
    if rows:
        e_u[rows] = real_uncond
    return e_u


def output_from_eps(eps: torch.Tensor, z: torch.Tensor, a_t, prediction: str) -> torch.Tensor:
    """The model output (ε, v or x0) that `split_output` reads as this ε at ā_t."""
    if prediction == "epsilon":
        return eps
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if prediction == "v_prediction":
        return a_t.sqrt() * eps - (1 - a_t).sqrt() * x0
    return x0


def pick_added(added: dict | None, rows: torch.Tensor) -> dict | None:
    """Select the conditioning rows of every tensor of added_cond_kwargs (lists of IP embeds too)."""
    if added is None:
        return None
    return {k: [e[rows] for e in v] if isinstance(v, list) else v[rows] for k, v in added.items()}


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
