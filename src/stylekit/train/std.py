"""Single Trajectory Distillation's generator step (Xu et al. 2024, arXiv 2412.18945).

The student learns to be self-consistent along the one teacher trajectory that starts at the
stylisation strength η: from the teacher's state x_k it jumps to a target step τ_s, and must land
where it lands from the teacher's next state x_{k−1} (pseudo-Huber; the target is the same student
without gradient). The asymmetric adversarial loss compares the decoded jump with a real image
noised to r < τ_s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stylekit.train.bank import Bank, Trajectory
from stylekit.train.losses import (
    ddim_jump,
    grid_t,
    jump_span,
    pseudo_huber,
    start_index,
    target_t,
)
from stylekit.train.nets import Nets


@dataclass
class Generated:
    """What a method's generator step hands the shared loop."""

    loss: torch.Tensor  # the method's own generator loss (the adversarial term is added outside)
    logs: dict[str, float]
    fake: torch.Tensor | None  # decoded student output, with grad (None: adversarial off)
    real: torch.Tensor | None  # the real side, no grad
    cond: torch.Tensor  # (B, P) the discriminator's condition


@dataclass(frozen=True)
class StdSettings:
    eta: float
    gamma: float
    bank_prob: float
    cfg: tuple[float, float]  # guidance scale range; w = scale − 1


def fresh(nets: Nets, x0, embeds, pooled, g: torch.Generator, s: StdSettings) -> Trajectory:
    """A new trajectory at k_η: x = √ā x0 + √(1 − ā) ε, with its own guidance w."""
    k = start_index(s.eta)
    a = nets.ac[grid_t(k)]
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    w = s.cfg[0] - 1 + (s.cfg[1] - s.cfg[0]) * torch.rand((), generator=g).item()
    return Trajectory(k, a.sqrt() * x0 + (1 - a).sqrt() * noise, x0, embeds, pooled, w)


def teacher_step(nets: Nets, trajs: list[Trajectory]) -> list[Trajectory]:
    """One guided DDIM step k → k − 1 for each trajectory (batched)."""
    x = torch.stack([t.x for t in trajs])
    k = torch.tensor([t.k for t in trajs], device=x.device)
    t_now, t_next = (k + 1) * 20 - 1, k * 20 - 1  # grid_t(k), grid_t(k − 1); k = 0 → ā_0
    eps = nets.teacher_eps(
        x,
        t_now,
        torch.stack([t.embeds for t in trajs]),
        torch.stack([t.pooled for t in trajs]),
        torch.tensor([t.w for t in trajs], device=x.device),
    )
    x_next = ddim_jump(x, eps, nets.alphas(t_now), nets.alphas(t_next))
    return [
        Trajectory(t.k - 1, xn, t.x0, t.embeds, t.pooled, t.w)
        for t, xn in zip(trajs, x_next, strict=True)
    ]


def rollout(nets: Nets, traj: Trajectory, k: int) -> Trajectory:
    """Without a bank: the teacher's full rollout from k_η down to k."""
    while traj.k > k:
        (traj,) = teacher_step(nets, [traj])
    return traj


def starts(nets: Nets, bank: Bank, batch, x0, gens, s: StdSettings):
    """The states to train on: continued from the bank (prob. ρ) or fresh; without a bank, a
    fresh trajectory rolled out to a uniform k in [2, k_η]. Returns (states, their slots)."""
    embeds, pooled = nets.text(batch["caption"])
    states, slots, taken = [], [], set()
    for i, g in enumerate(gens):
        slot = bank.take(g, s.bank_prob, taken) if bank.slots else None
        if slot is not None:
            taken.add(slot)
            state = bank.slots[slot]
        else:
            state = fresh(nets, x0[i], embeds[i], pooled[i], g, s)
            if not bank.slots:
                k = int(torch.randint(2, state.k + 1, (), generator=g))
                state = rollout(nets, state, k)
        states.append(state)
        slots.append(slot)
    return states, slots


def generator_step(
    nets: Nets, bank: Bank, batch, gens, s: StdSettings, *, adversarial: bool
) -> Generated:
    """Consistency loss between the jumps from x_k and from the teacher's x_{k−1} to τ_s."""
    x0 = nets.encode(batch["pixels"], gens)
    states, slots = starts(nets, bank, batch, x0, gens, s)
    nexts = teacher_step(nets, states)
    for slot, nxt in zip(slots, nexts, strict=True):
        bank.put(slot, nxt)
    span = jump_span(s.eta, s.gamma)
    target_s = [
        int(torch.randint(max(0, st.k - span), st.k, (), generator=g))
        for st, g in zip(states, gens, strict=True)
    ]
    dev = x0.device
    k = torch.tensor([st.k for st in states], device=dev)
    tau = torch.tensor([target_t(v) for v in target_s], device=dev)
    t_k, t_prev = (k + 1) * 20 - 1, k * 20 - 1
    embeds = torch.stack([st.embeds for st in states])
    pooled = torch.stack([st.pooled for st in states])
    x_k, x_prev = torch.stack([st.x for st in states]), torch.stack([n.x for n in nexts])
    online = ddim_jump(
        x_k, nets.eps(x_k, t_k, embeds, pooled, grad=True), nets.alphas(t_k), nets.alphas(tau)
    )
    with torch.no_grad():
        eps_prev = nets.eps(x_prev, t_prev, embeds, pooled)
        target = ddim_jump(x_prev, eps_prev, nets.alphas(t_prev), nets.alphas(tau))
    loss = pseudo_huber(online, target)
    logs = {"consistency": loss.item()}
    if not adversarial:
        return Generated(loss, logs, None, None, pooled)
    return Generated(
        loss, logs, nets.decode(online), real_side(nets, states, target_s, gens), pooled
    )


@torch.no_grad()
def real_side(nets: Nets, states: list[Trajectory], target_s: list[int], gens) -> torch.Tensor:
    """The real image noised to r = floor(u · 20 s) < τ_s (asymmetric: less noise than the fake)."""
    x0 = torch.stack([st.x0 for st in states])
    r = [
        int(torch.rand((), generator=g).item() * 20 * v)
        for v, g in zip(target_s, gens, strict=True)
    ]
    a = nets.alphas(torch.tensor(r, device=x0.device))
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0.device)
    return nets.decode(a.sqrt() * x0 + (1 - a).sqrt() * noise)
