"""STD's trajectory bank: a few teacher trajectories kept between steps, one DDIM step at a time.

A fresh trajectory starts at k_η from a training image; each later step either continues a stored
one (with probability ρ) or starts another. After the teacher's step k → k − 1 the state moves on
in its slot; a trajectory that reaches k − 1 ≤ 1 is done and frees its slot, and a fresh one that
finds every slot full is dropped after its step. With the bank a training step costs one teacher
DDIM step instead of a rollout from k_η (STD §3.3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Trajectory:
    """One sample on one teacher trajectory; its conditioning and guidance travel with it."""

    k: int  # grid index of `x`: x is at t_k
    x: torch.Tensor  # (4, h, w) latent at t_k
    x0: torch.Tensor  # (4, h, w) the clean latent it started from (the adversarial real side)
    embeds: torch.Tensor  # (77, D) prompt embeddings
    pooled: torch.Tensor  # (P,) pooled text embedding (the discriminator's condition)
    w: float  # teacher guidance: ε̂ = ε_c + w (ε_c − ε_u)


class Bank:
    """`slots` stored trajectories (None = empty); 0 slots means no bank (full rollouts)."""

    def __init__(self, slots: int):
        self.slots: list[Trajectory | None] = [None] * slots

    def occupied(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def take(self, generator: torch.Generator, rho: float, taken: set[int]) -> int | None:
        """With probability ρ, a random occupied slot not already taken this step; else None."""
        u = torch.rand((), generator=generator).item()
        free = [i for i in self.occupied() if i not in taken]
        if u >= rho or not free:
            return None
        return free[int(torch.randint(len(free), (), generator=generator))]

    def put(self, slot: int | None, traj: Trajectory) -> None:
        """Store the state after a teacher step: in its slot, the first empty one, or nowhere."""
        if traj.k <= 1:
            if slot is not None:
                self.slots[slot] = None
            return
        if slot is None:
            empty = [i for i, s in enumerate(self.slots) if s is None]
            if not empty:
                return  # a full bank drops fresh trajectories
            slot = empty[0]
        self.slots[slot] = Trajectory(**{k: _detach(v) for k, v in asdict(traj).items()})

    def state_dict(self) -> dict:
        return {"slots": [None if s is None else asdict(s) for s in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        self.slots = [None if s is None else Trajectory(**s) for s in state["slots"]]


def _detach(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
