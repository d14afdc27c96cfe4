"""Few-step consistency samplers (TCD, LCM) as pure functions, and their timestep arithmetic.

Formulas in `docs/sampling.md`: TCD (Zheng et al. 2024, arXiv 2402.19159), LCM (Luo et al.
2023, arXiv 2310.04378). Nothing here keeps state between calls: a step takes the model output, the
current and next timestep and the latent, and returns the next latent. That is what lets MultiDiffusion
step each window independently and lets parity be checked against diffusers' schedulers.

The model output is what the model was trained to predict (its scheduler config's
`prediction_type`): the noise ε (`epsilon`), the velocity v = √ā ε − √(1 − ā) x0 (`v_prediction`,
SD 2.x 768 and many fine-tunes) or the clean latent itself (`sample`). `split_output` turns each into
(x0, ε); everything else in a step is the same for all three.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from stylekit.errors import ModelError, UsageError

SCHEDULERS = ("tcd", "lcm")
PREDICTIONS = ("epsilon", "v_prediction", "sample")  # diffusers' `prediction_type` values
ORIGINAL_STEPS = 50  # the distillation grid: t = 20 i - 1 for 1000 training steps
TIMESTEP_SCALING = 10.0  # LCM boundary condition, as diffusers' default


def alphas_cumprod(config: dict) -> torch.Tensor:
    """Return ā_t for every training timestep from a diffusers scheduler config (float32, like diffusers)."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = config.get("beta_schedule", "scaled_linear")
    if "trained_betas" in config and config["trained_betas"] is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise UsageError(
            f"unsupported beta_schedule {schedule!r} (scaled_linear, linear, squaredcos_cap_v2)"
        )
    if config.get("rescale_betas_zero_snr"):  # Lin et al. 2023, as diffusers' schedulers rescale
        from diffusers.schedulers.scheduling_tcd import rescale_zero_terminal_snr

        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Return the Glide cosine schedule's betas (Nichol & Dhariwal 2021)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def consistency_timesteps(
    n: int, *, original_steps: int = ORIGINAL_STEPS, train_steps: int = 1000
) -> list[int]:
    """Return the n descending TCD/LCM timesteps: origin[floor(i * 50 / n)] on the 50-point grid."""
    if not 1 <= n <= original_steps:
        raise UsageError(f"{n} grid steps is outside 1..{original_steps}")
    k = train_steps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]  # 999, 979, ..., 19
    idx = np.floor(np.linspace(0, original_steps, num=n, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[idx]]


def trailing_timesteps(n: int, *, train_steps: int = 1000) -> list[int]:
    """Return n descending timesteps with "trailing" spacing, as turbo (ADD) models expect."""
    if not 1 <= n <= train_steps:
        raise UsageError(f"{n} steps is outside 1..{train_steps}")
    return [
        int(t) for t in np.round(np.arange(train_steps, 0, -train_steps / n)).astype(np.int64) - 1
    ]


def strength_tail(timesteps: Sequence[int], strength: float) -> list[int]:
    """Keep the last int(n * strength) timesteps, as diffusers' img2img `get_timesteps` does."""
    n = len(timesteps)
    keep = min(int(n * strength), n)
    return list(timesteps[n - keep :])


def grid_steps_for(nfe: int, strength: float, *, original_steps: int = ORIGINAL_STEPS) -> int:
    """Return the schedule length n whose strength tail runs exactly `nfe` steps (n = ceil(nfe / η) or up)."""
    if nfe < 1:
        raise UsageError(f"--steps must be at least 1, got {nfe}")
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {strength}")
    n = math.ceil(nfe / strength)
    while n <= original_steps and int(n * strength) != nfe:
        n += 1
    if n > original_steps:
        raise UsageError(
            f"{nfe} steps at strength {strength} need more than the {original_steps}-step grid; "
            "lower --steps or raise --strength"
        )
    return n


def img2img_schedule(
    nfe: int, strength: float, *, turbo: bool = False, original_steps: int = ORIGINAL_STEPS
) -> tuple[int, list[int]]:
    """Return (n, timesteps): the full schedule length and the `nfe` timesteps actually run."""
    if turbo:
        n = max(nfe, math.ceil(nfe / strength))
        while int(n * strength) < nfe:
            n += 1
        return n, strength_tail(trailing_timesteps(n), strength)
    n = grid_steps_for(nfe, strength, original_steps=original_steps)
    return n, strength_tail(consistency_timesteps(n, original_steps=original_steps), strength)


def add_noise(z0: torch.Tensor, noise: torch.Tensor, t: int, ac: torch.Tensor) -> torch.Tensor:
    """Noise a clean latent to timestep t: sqrt(ā_t) z0 + sqrt(1 − ā_t) ε (diffusers' add_noise)."""
    a = ac[t].to(device=z0.device, dtype=z0.dtype)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def predict_x0(z: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """Return the ε-parameterised estimate of the clean latent."""
    return (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def split_output(
    out: torch.Tensor, z: torch.Tensor, a_t: torch.Tensor, prediction: str = "epsilon"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x0, ε) from the model output at ā_t for its prediction type (diffusers' formulas)."""
    if prediction == "epsilon":
        return predict_x0(z, out, a_t), out
    if prediction == "v_prediction":  # v = √ā ε − √(1 − ā) x0
        return a_t.sqrt() * z - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * z
    if prediction == "sample":
        return out, (z - a_t.sqrt() * out) / (1 - a_t).sqrt()
    raise UsageError(f"unknown prediction type {prediction!r}; one of {', '.join(PREDICTIONS)}")


def tcd_step(
    out: torch.Tensor,
    t: int,
    t_next: int,
    z: torch.Tensor,
    ac: torch.Tensor,
    *,
    gamma: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """Take one TCD step from t to t_next (0 after the last); `noise` is needed iff gamma > 0 and t_next > 0.

    With γ the step jumps to s = floor((1 − γ) t_next) and re-noises forward to t_next (Zheng et al. 2024).
    `out` is the model output, read as `prediction` says (see `split_output`).
    """
    s = int(torch.floor((1 - gamma) * torch.tensor(t_next)).to(torch.long))  # float32, as diffusers
    a_t, a_next, a_s = ac[t], ac[t_next], ac[s]
    x0, eps = split_output(out, z, a_t, prediction)
    z_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    if noise is None:
        return z_s
    return (a_next / a_s).sqrt() * z_s + (1 - a_next / a_s).sqrt() * noise


def lcm_step(
    out: torch.Tensor,
    t: int,
    t_next: int | None,
    z: torch.Tensor,
    ac: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    timestep_scaling: float = TIMESTEP_SCALING,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """Take one LCM step: the boundary-conditioned x0, re-noised to t_next unless it is the last step.

    `out` is the model output, read as `prediction` says (see `split_output`).
    """
    tau = t * timestep_scaling
    c_skip = 0.25 / (tau**2 + 0.25)
    c_out = tau / (tau**2 + 0.25) ** 0.5
    x0, _ = split_output(out, z, ac[t], prediction)
    denoised = c_out * x0 + c_skip * z
    if noise is None or t_next is None:
        return denoised
    a_next = ac[t_next]  # float32 scalar, as diffusers' LCMScheduler.step
    return a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise


@dataclass(frozen=True)
class Sampler:
    """A few-step sampler: which step rule, its γ, the ā table and the prediction type of the model."""

    kind: str
    ac: torch.Tensor
    gamma: float = 0.0
    prediction: str = "epsilon"  # what the UNet outputs: epsilon | v_prediction | sample
    timestep_scaling: float = TIMESTEP_SCALING  # LCM's boundary condition (MCM's card: 4)

    def needs_noise(self, i: int, n: int) -> bool:
        """Whether step i of n draws fresh noise (never on the last step)."""
        if i == n - 1:
            return False
        return self.kind == "lcm" or self.gamma > 0

    def step(self, out, ts: Sequence[int], i: int, z, noise=None) -> torch.Tensor:
        """Advance z from ts[i] to ts[i + 1] (or to the clean end after the last step)."""
        t_next = ts[i + 1] if i + 1 < len(ts) else 0
        p = self.prediction
        if self.kind == "tcd":
            return tcd_step(
                out, ts[i], t_next, z, self.ac, gamma=self.gamma, noise=noise, prediction=p
            )
        last = i + 1 == len(ts)
        return lcm_step(
            out,
            ts[i],
            None if last else t_next,
            z,
            self.ac,
            noise=noise,
            timestep_scaling=self.timestep_scaling,
            prediction=p,
        )


def make_sampler(kind: str, scheduler_config: dict, *, gamma: float = 0.0) -> Sampler:
    """Build a Sampler for `kind` (tcd|lcm) from the model's scheduler config (ā and prediction type)."""
    if kind not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")
    if not 0.0 <= gamma <= 1.0:
        raise UsageError(f"--gamma must be in [0, 1], got {gamma}")
    prediction = scheduler_config.get("prediction_type") or "epsilon"
    if prediction not in PREDICTIONS:
        raise ModelError(
            f"the model's scheduler config has prediction_type {prediction!r}; "
            f"stylekit samples {', '.join(PREDICTIONS)}"
        )
    scaling = float(scheduler_config.get("timestep_scaling", TIMESTEP_SCALING))
    return Sampler(kind, alphas_cumprod(scheduler_config), gamma, prediction, scaling)


NoiseFn = Callable[
    [int, torch.Tensor], torch.Tensor
]  # (step i, model output) → the noise step i adds
AfterStep = Callable[[int, torch.Tensor], torch.Tensor]  # (step i, z) → z
# guidance(ts, z0=None, noise=None) → the after_step of a trajectory over `ts` (AD refinement);
# z0 and noise are the content's clean latent and start noise when there is a content image.
Guidance = Callable[..., AfterStep]


def trajectory(
    z: torch.Tensor,
    ts: Sequence[int],
    sampler: Sampler,
    *,
    noise: NoiseFn,
    after_step: AfterStep | None = None,
) -> Generator[tuple[torch.Tensor, int], torch.Tensor, torch.Tensor]:
    """The few-step loop as a generator: yields (z, t) for each model call, is sent the model's
    output (ε, v or x0, as `sampler.prediction` says), returns z.

    `noise(i, eps)` is asked for only on steps that re-noise; `after_step(i, z)` may rewrite the
    latent after each step (inpaint blending, AD refinement). `sample` drives one trajectory with
    an ε-prediction callable; a video stream drives several at once, one batched UNet call a round.
    """
    n = len(ts)
    for i, t in enumerate(ts):
        eps = yield z, t
        fresh = noise(i, eps) if sampler.needs_noise(i, n) else None
        z = sampler.step(eps, ts, i, z, fresh)
        if after_step is not None:
            z = after_step(i, z)
    return z


def drawn_noise(generator: torch.Generator | list[torch.Generator] | None) -> NoiseFn:
    """Noise drawn like diffusers' schedulers draw it: after the model call, shaped like ε."""
    return lambda i, eps: randn_tensor(
        eps.shape, generator=generator, device=eps.device, dtype=eps.dtype
    )


def sample(
    eps_fn: Callable[[torch.Tensor, int], torch.Tensor],
    z: torch.Tensor,
    ts: Sequence[int],
    sampler: Sampler,
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    after_step: AfterStep | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the few-step loop: z ← step(eps_fn(z, t)); noise is drawn like diffusers, after the model call.

    `eps_fn` returns the model output (ε, v or x0: `sampler.prediction`); it is where CFG, window
    averaging (MultiDiffusion) and other prediction composes, all linear in the output;
    `after_step(i, z)` may rewrite the latent after each step (inpaint blending, AD refinement).
    """
    run = trajectory(z, ts, sampler, noise=drawn_noise(generator), after_step=after_step)
    request = next(run)
    for i in range(len(ts)):
        eps = eps_fn(*request)
        try:
            request = run.send(eps)
        except StopIteration as done:
            z = done.value
        if callback is not None:
            callback(i + 1, len(ts))
    return z
