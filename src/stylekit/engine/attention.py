"""Self-attention features of a diffusers UNet: layer selection, recording processors, AD losses.

Attention Distillation (Zhou et al., CVPR 2025, arXiv 2502.20235) compares the self-attention of a
target latent with that of reference latents. Layers are chosen by processor name and recorded by a
processor that computes exactly what diffusers' `AttnProcessor2_0` computes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stylekit.errors import UsageError

DEFAULT_LAYER_COUNT = 6  # "the last 6 self-attention layers" of the AD paper (SD1.5 and SDXL)
_FORWARD_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # UNet2DConditionModel.forward
_SUFFIX = ".processor"
_SELF_ATTENTION = ".attn1" + _SUFFIX


# --- layer selection ---------------------------------------------------------------------------


def self_attention_layers(unet) -> list[str]:
    """Return the `attn1` processor names of `unet` in forward order: down, mid, then up blocks."""
    names = [name for name in unet.attn_processors if name.endswith(_SELF_ATTENTION)]
    # `attn_processors` lists down, up, mid (module registration order); the sort is stable.
    return sorted(names, key=lambda name: _FORWARD_ORDER.get(name.split(".")[0], 3))


def select_layers(unet, spec: int | str | Sequence[str] | None = None) -> list[str]:
    """Return the processor names to record: the last `spec` (default 6) `attn1` layers, or named.

    Names may be given with or without the trailing `.processor`.
    """
    allowed = self_attention_layers(unet)
    if not allowed:
        raise UsageError(f"{type(unet).__name__} has no self-attention (attn1) layers to record")
    if spec is None:
        return allowed[-DEFAULT_LAYER_COUNT:]
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 1 <= spec <= len(allowed):
            raise UsageError(
                f"layer count {spec} is out of range: this UNet has 1..{len(allowed)} "
                "self-attention layers"
            )
        return allowed[-spec:]
    names = [spec] if isinstance(spec, str) else list(spec)
    if not names:
        raise UsageError(f"no attention layers given; allowed: {', '.join(allowed)}")
    keys = [name if name.endswith(_SUFFIX) else name + _SUFFIX for name in names]
    for name, key in zip(names, keys, strict=True):
        if key not in allowed:
            raise UsageError(
                f"unknown self-attention layer {name!r}; allowed: {', '.join(allowed)}"
            )
    return list(dict.fromkeys(keys))


# --- recording processor -----------------------------------------------------------------------


@dataclass
class AttentionFeatures:
    """One layer's attention, each (B, heads, N, d); `out` is SDPA(q, k, v) before `to_out`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


Features = dict[str, AttentionFeatures]  # processor name -> that layer's features


@dataclass
class FeatureStore:
    """What the recording processors of one `record_attention` block share.

    `features` is filled by every UNet forward while `recording` is on (the last forward wins).
    `extra_kv[name] = (k, v)`, each (B or 1, heads, M, d), lets that layer also attend to M extra
    tokens (e.g. an anchor frame's k and v); `k`, `v` recorded are still the layer's own.
    """

    features: Features = field(default_factory=dict)
    extra_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    recording: bool = True

    def clear(self) -> None:
        """Forget the recorded features (they may hold autograd graphs)."""
        self.features.clear()

    def inject(self, feats: Mapping[str, AttentionFeatures]) -> None:
        """Let each layer of `feats` also attend to that layer's recorded k and v."""
        self.extra_kv = {name: (f.k, f.v) for name, f in feats.items()}


def _project(attn, hidden_states, encoder_hidden_states, attention_mask):
    """Return q, k, v as (B, heads, N, d) and the SDPA mask, built as `AttnProcessor2_0` does."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, tokens, _ = context.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    q = attn.to_q(hidden_states)  # (B, N, heads * d)
    k = attn.to_k(encoder_hidden_states)  # (B, S, heads * d)
    v = attn.to_v(encoder_hidden_states)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
    # q: (B, heads, N, d); k, v: (B, heads, S, d)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v, attention_mask


def _append_kv(k, v, mask, extra):
    """Append extra (k, v) along the tokens of k, v and let the mask attend to them."""
    ek, ev = (x.to(k.dtype).expand(k.shape[0], -1, -1, -1) for x in extra)  # (B, heads, M, d)
    if mask is not None:
        shape = (*mask.shape[:-1], ek.shape[2])
        pad = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
        mask = torch.cat([mask, pad], dim=-1)  # (B, heads, 1 or N, S + M)
    return torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2), mask  # (B, heads, S + M, d)


class RecordingAttnProcessor:
    """`AttnProcessor2_0` that also stores q, k, v and SDPA's output under `name` in `store`."""

    def __init__(self, name: str, store: FeatureStore):
        self.name = name
        self.store = store

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, N, C)
        q, k, v, mask = _project(attn, hidden_states, encoder_hidden_states, attention_mask)
        extra = self.store.extra_kv.get(self.name)
        k_all, v_all, mask = (k, v, mask) if extra is None else _append_kv(k, v, mask, extra)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, heads, N, d)
        if self.store.recording:
            self.store.features[self.name] = AttentionFeatures(q, k, v, out)
        hidden_states = out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, N, heads * d)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)  # (B, C, H, W)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def record_attention(
    unet, layers: int | str | Sequence[str] | None = None
) -> Iterator[FeatureStore]:
    """Record `layers` (see `select_layers`) in the block; restore the original processors after."""
    names = select_layers(unet, layers)
    store = FeatureStore()
    originals = unet.attn_processors
    mapping = dict(
        originals
    )  # a partial mapping raises in diffusers: replace entries of the full one
    mapping.update({name: RecordingAttnProcessor(name, store) for name in names})
    unet.set_attn_processor(mapping)
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(originals))  # set_attn_processor pops from the dict it gets


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
