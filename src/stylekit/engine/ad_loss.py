"""The attention-distillation losses on recorded self-attention features, and label masks.

AD (Zhou et al., CVPR 2025, arXiv 2502.20235) compares a target's self-attention output with the
attention of its queries over the references' keys and values; docs/attention-distillation.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stylekit.engine.attention import AttentionFeatures
from stylekit.errors import UsageError

# --- label masks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMaps:
    """Label maps for controlled synthesis: `target` (H, W) and one (H', W') per reference.

    Each map has its latent's aspect ratio (any resolution); equal labels attend to each other.
    """

    target: torch.Tensor
    references: Sequence[torch.Tensor]


@functools.cache
def token_grid(tokens: int, aspect: float) -> tuple[int, int]:
    """Return the (h, w) with h * w = tokens whose ratio h / w is closest to `aspect`."""
    grids = [(h, tokens // h) for h in range(1, tokens + 1) if tokens % h == 0]
    return min(grids, key=lambda hw: abs(math.log(hw[0] / hw[1] / aspect)))


def _labels_at(label_map: torch.Tensor, tokens: int) -> torch.Tensor:
    """Nearest-resize a (H, W) label map to the token grid of a layer with `tokens` tokens."""
    h, w = token_grid(tokens, label_map.shape[-2] / label_map.shape[-1])
    grid = F.interpolate(label_map[None, None].float(), size=(h, w), mode="nearest")  # (1, 1, h, w)
    return grid.flatten()  # (h * w,)


def label_mask(
    maps: LabelMaps, target_tokens: int, reference_tokens: Sequence[int]
) -> torch.Tensor:
    """Return the boolean (N_t, sum N_r) mask `label_tgt[i] == label_src[j]` of one layer.

    A target token whose label no reference token has attends to every reference token.
    """
    if len(maps.references) != len(reference_tokens):
        raise UsageError(
            f"{len(maps.references)} reference label maps for {len(reference_tokens)} references"
        )
    target = _labels_at(maps.target, target_tokens)
    source = torch.cat(
        [_labels_at(m, n) for m, n in zip(maps.references, reference_tokens, strict=True)]
    )
    mask = target[:, None] == source[None, :]  # (N_t, sum N_r)
    return mask | ~mask.any(dim=1, keepdim=True)


# --- losses ------------------------------------------------------------------------------------


def _joint_kv(refs: Sequence[AttentionFeatures], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the references' k and v along tokens (one joint softmax), repeated to `batch`."""
    k = torch.cat([r.k.float() for r in refs], dim=2)  # (B_r, heads, sum N_r, d)
    v = torch.cat([r.v.float() for r in refs], dim=2)
    return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)  # (B, heads, sum N_r, d)


def ad_loss(
    target_feats: Mapping[str, AttentionFeatures],
    ref_feats: Mapping[str, AttentionFeatures] | Sequence[Mapping[str, AttentionFeatures]],
    *,
    attn_scale: float = 1.0,
    masks: LabelMaps | None = None,
) -> torch.Tensor:
    """Return the AD loss, sum over layers of mean |T.out - SDPA(T.q * s, R.k, R.v, mask)|, fp32."""
    refs = [ref_feats] if isinstance(ref_feats, Mapping) else list(ref_feats)
    losses = []
    for name, t in target_feats.items():
        layer_refs = [r[name] for r in refs]
        k, v = _joint_kv(layer_refs, t.q.shape[0])
        mask = None
        if masks is not None:
            tokens = [r.k.shape[2] for r in layer_refs]
            mask = label_mask(masks, t.q.shape[2], tokens).to(t.q.device)  # (N_t, sum N_r)
        with torch.no_grad():  # the goal is detached
            goal = F.scaled_dot_product_attention(t.q.float() * attn_scale, k, v, attn_mask=mask)
        losses.append((t.out.float() - goal).abs().mean())
    return torch.stack(losses).sum()


def content_loss(
    target_feats: Mapping[str, AttentionFeatures], content_feats: Mapping[str, AttentionFeatures]
) -> torch.Tensor:
    """Return the AD content loss, sum over layers of mean |T.q - C.q| (C detached), in fp32."""
    losses = [
        (t.q.float() - content_feats[name].q.detach().float()).abs().mean()
        for name, t in target_feats.items()
    ]
    return torch.stack(losses).sum()
