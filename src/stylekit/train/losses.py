"""The training losses and the grid arithmetic they share, as pure functions on tensors.

STD: Single Trajectory Distillation (Xu et al. 2024, arXiv 2412.18945). ADD: Adversarial Diffusion
Distillation (Sauer et al. 2023, arXiv 2311.17042). Formulas in docs/distillation.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRID = 50  # the teacher's DDIM grid: t_k = 20 (k + 1) - 1 for 1000 training steps
HUBER_C = 0.001  # pseudo-Huber's c, as STD trains


def grid_t(k: int, train_steps: int = 1000) -> int:
    """The timestep of grid point k (0 → 19, 49 → 999)."""
    return train_steps // GRID * (k + 1) - 1


def start_index(eta: float) -> int:
    """k_η = ceil(50 η), the grid point where a strength-η trajectory starts (η 0.75 → 38, t 779)."""
    return min(math.ceil(GRID * eta - 1e-9), GRID - 1)


def jump_span(eta: float, gamma: float) -> int:
    """R = ceil(50 η (1 − γ)): how many grid points below k the target step may lie (at least 1)."""
    return max(1, math.ceil(GRID * eta * (1.0 - gamma) - 1e-9))


def alpha_at(ac: torch.Tensor, t: int) -> torch.Tensor:
    """ā at timestep t, with ā at t < 0 meaning ā_0 (DDIM's final step without `set_alpha_to_one`)."""
    return ac[max(t, 0)]


def target_t(s: int, train_steps: int = 1000) -> int:
    """τ_s = 20 s − 1: where a jump to target index s lands (s = 0 → −1, read as ā_0)."""
    return train_steps // GRID * s - 1


def ddim_jump(
    x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_to: torch.Tensor
) -> torch.Tensor:
    """J(x, t → τ) = √ā_τ x̂0 + √(1 − ā_τ) ε̂ with x̂0 = (x − √(1 − ā_t) ε̂) / √ā_t (DDIM, η = 0).

    `a_t`, `a_to` broadcast against x: scalars or (B, 1, 1, 1)."""
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = HUBER_C) -> torch.Tensor:
    """mean(√((pred − target)² + c²) − c) in fp32: quadratic near 0, |d| − c far from it."""
    d = pred.float() - target.float()
    return (torch.sqrt(d * d + c * c) - c).mean()


def hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge: mean max(0, 1 − D(real)) + mean max(0, 1 + D(fake)).

    STD's released `wgan` form, mean max(−1, −D(real)) + mean max(−1, D(fake)), is this minus 2."""
    return F.relu(1 - real.float()).mean() + F.relu(1 + fake.float()).mean()


def hinge_g(fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge: −mean D(fake)."""
    return -fake.float().mean()


def r1_penalty(logits: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
    """R1 on the heads' inputs: Σ_k ‖∂ Σ D / ∂F_k‖² per sample, averaged over the batch.

    `features` must require grad and be what `logits` was computed from; the graph is kept so
    the penalty itself trains the heads."""
    grads = torch.autograd.grad(logits.sum(), features, create_graph=True)
    return sum(g.float().pow(2).flatten(1).sum(1) for g in grads).mean()


def add_distillation(
    student_x0: torch.Tensor, teacher_x0: torch.Tensor, a_t: torch.Tensor
) -> torch.Tensor:
    """ADD's distillation loss: mean over samples of c(t) · mean((x̂θ − x̂ψ)²), c(t) = √ā_t.

    `a_t` is ā_t per sample (B,); the teacher's side carries no gradient."""
    per_sample = (student_x0.float() - teacher_x0.detach().float()).pow(2).flatten(1).mean(1)
    return (a_t.float().sqrt() * per_sample).mean()
