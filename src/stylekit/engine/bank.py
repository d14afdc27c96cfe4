"""A bounded bank of past frames' self-attention keys and values (StreamV2V's feature bank).

See docs/video.md (Liang et al., "Looking Backward: Streaming Video-to-Video Translation with
Feature Banks", arXiv 2405.15757). Every chosen self-attention layer of every frame also attends
to the keys and values banked from earlier frames at the same denoising stage (and the same CFG
row kind), so textures and colours are looked up from the past and stay put.

One bank per (stage, conditioning row, layer) holds at most `size` frames' worth of tokens
(`size · N`, N the layer's tokens per frame); only k and v are kept. A writing frame adds its
tokens after it attended: a token whose key has cosine similarity ≥ `merge` with a banked key
is merged into it (k and v averaged, as in token merging), the others are appended, and when
the bank is over its bound the oldest tokens go. Merging keeps a static scene to one frame's
tokens, eviction keeps the bank current: it never holds more than its bound.

The anchor (`--consistency anchor`) is this bank with one frame, no merging, written by one
frame in `every` (a new anchor replaces the old).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Key = tuple[int, int]  # (stage, conditioning row: 0 uncond, 1 cond; 0 without CFG)


@dataclass
class Slot:
    """One layer's bank at one stage: k, v (heads, M, d) and each token's last-written frame."""

    k: torch.Tensor
    v: torch.Tensor
    age: torch.Tensor  # (M,) long: the frame index that last wrote the token
    bound: int  # the most tokens it may hold: bank size × the layer's tokens per frame

    @property
    def tokens(self) -> int:
        return self.k.shape[1]


@dataclass
class Row:
    """What one UNet row of a call reads and writes: its bank key, and whether it stores."""

    key: Key
    frame: int
    writes: bool


@dataclass
class FeatureBank:
    """Banked k/v per (stage, conditioning row) and layer; `rows` describes the current call."""

    size: int = 1  # frames' worth of tokens per slot (StreamV2V's cache_maxframes)
    merge: float | None = 0.98  # cosine above which a new token merges; None: never merge
    slots: dict[Key, dict[str, Slot]] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    peak: int = 0  # the most tokens any slot held right after a write, over the whole run

    def extra(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each row's banked (k, v) for layer `name` (None where nothing is banked yet)."""
        out = []
        for row in self.rows:
            slot = self.slots.get(row.key, {}).get(name)
            out.append(None if slot is None else (slot.k, slot.v))
        return out

    def seen(self, name: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the writing rows' own k, v (B, heads, N, d) of layer `name`."""
        for r, row in enumerate(self.rows):
            if row.writes:
                slots = self.slots.setdefault(row.key, {})
                slots[name] = self.update(slots.get(name), k[r].detach(), v[r].detach(), row.frame)
                self.peak = max(self.peak, slots[name].tokens)

    def update(self, slot: Slot | None, k: torch.Tensor, v: torch.Tensor, frame: int) -> Slot:
        """Merge near-duplicates, append the rest, drop the oldest beyond `size` frames."""
        n = k.shape[1]
        age = torch.full((n,), frame, dtype=torch.long, device=k.device)
        bound = self.size * n
        if slot is None:
            return Slot(k.clone(), v.clone(), age, bound)
        if self.merge is not None:
            slot, fresh = merged(slot, k, v, frame, self.merge)
            k, v, age = k[:, fresh], v[:, fresh], age[fresh]
        k, v = torch.cat([slot.k, k], dim=1), torch.cat([slot.v, v], dim=1)  # (heads, M + n', d)
        age = torch.cat([slot.age, age])
        if age.shape[0] > bound:  # keep the newest `bound` tokens, in bank order
            keep = torch.sort(torch.argsort(age, descending=True, stable=True)[:bound]).values
            k, v, age = k[:, keep], v[:, keep], age[keep]
        return Slot(k, v, age, bound)

    def set_rows(self, rows: Sequence[Row]) -> None:
        self.rows = list(rows)


def merged(slot: Slot, k: torch.Tensor, v: torch.Tensor, frame: int, threshold: float):
    """Average each new token whose key is ≥ `threshold` cosine-similar to a banked key into that
    banked token (k and v alike); return the new slot and the mask of the tokens left to append."""
    heads, n, d = k.shape
    new = F.normalize(k.transpose(0, 1).reshape(n, heads * d).float(), dim=-1)  # (n, heads·d)
    old = F.normalize(slot.k.transpose(0, 1).reshape(slot.tokens, heads * d).float(), dim=-1)
    best, target = (new @ old.T).max(dim=-1)  # (n,): the most similar banked token
    dup = best >= threshold
    if not dup.any():
        return slot, ~dup
    index = target[dup]  # banked tokens receiving merges
    bank_k, bank_v = slot.k.clone(), slot.v.clone()
    for bank, src in ((bank_k, k), (bank_v, v)):
        scatter = index[None, :, None].expand(heads, -1, d)  # (heads, n_dup, d)
        bank.scatter_reduce_(1, scatter, src[:, dup], reduce="mean", include_self=True)
    age = slot.age.clone()
    age[index] = frame  # merged tokens are current again
    return Slot(bank_k, bank_v, age, slot.bound), ~dup
