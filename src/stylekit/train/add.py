"""Adversarial Diffusion Distillation's generator step (Sauer et al. 2023, arXiv 2311.17042).

The student denoises an image noised to one of its four timesteps in one step; the frozen teacher,
given that result re-noised to a random t, says what it should have been (distillation, weighted
c(t) = √ā_t), and the discriminator compares the decoded result with the clean image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stylekit.engine.sampling import trailing_timesteps
from stylekit.train.losses import GRID, add_distillation, grid_t
from stylekit.train.nets import Nets, randn, uniform
from stylekit.train.std import Generated

STUDENT_STEPS = 4  # T_student = {999, 749, 499, 249}, trailing spacing as the turbo models sample


@dataclass(frozen=True)
class AddSettings:
    distill_weight: float  # λ in L = L_adv + λ L_distill
    cfg: tuple[float, float]  # teacher guidance scale range


def x0_of(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x − √(1 − ā) ε̂) / √ā."""
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def generator_step(nets: Nets, batch, gens, s: AddSettings, *, adversarial: bool) -> Generated:
    """One-step student from T_student; teacher's guided x̂0 of its re-noised output as target."""
    dev = nets.device
    x0 = nets.encode(batch["pixels"], gens)
    embeds, pooled = nets.text(batch["caption"])
    ts = trailing_timesteps(STUDENT_STEPS)
    t_s = torch.tensor(
        [ts[int(torch.randint(STUDENT_STEPS, (), generator=g))] for g in gens], device=dev
    )
    a_s = nets.alphas(t_s)
    x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * randn(x0.shape[1:], gens, dev)
    student_x0 = x0_of(x_s, nets.eps(x_s, t_s, embeds, pooled, grad=True), a_s)
    t = torch.tensor([grid_t(int(torch.randint(GRID, (), generator=g))) for g in gens], device=dev)
    a_t = nets.alphas(t)
    x_t = a_t.sqrt() * student_x0.detach() + (1 - a_t).sqrt() * randn(x0.shape[1:], gens, dev)
    w = uniform(gens, s.cfg[0] - 1, s.cfg[1] - 1, dev)
    teacher_x0 = x0_of(x_t, nets.teacher_eps(x_t, t, embeds, pooled, w), a_t)
    distill = add_distillation(student_x0, teacher_x0, a_t.flatten())
    logs = {"distill": distill.item()}
    loss = s.distill_weight * distill
    if not adversarial:
        return Generated(loss, logs, None, None, pooled)
    return Generated(loss, logs, nets.decode(student_x0), batch["pixels"].to(dev).float(), pooled)
