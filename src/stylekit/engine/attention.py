"""Self-attention of a diffusers UNet: layer selection and two plain processors installed by name.

A recording processor stores q, k, v and the attention output of chosen layers (attention
distillation's features, an anchor frame's k/v); an injecting processor lets a layer's queries also
attend to extra tokens' k/v (anchor attention in video). Both compute exactly what diffusers'
`AttnProcessor2_0` computes, and are installed for a block by context managers that restore the
UNet's own processors. See docs/attention-distillation.md and docs/video.md.
"""

from __future__ import annotations

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
    """Return the spatial `attn1` processor names of `unet` in forward order: down, mid, then up
    blocks (a motion UNet's temporal attention, over frames, is left out)."""
    names = [
        name
        for name in unet.attn_processors
        if name.endswith(_SELF_ATTENTION) and "motion_modules" not in name  # spatial only
    ]
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
    """What the recording processors of one `record_attention` block fill: the last forward wins."""

    features: Features = field(default_factory=dict)

    def clear(self) -> None:
        """Forget the recorded features (they may hold autograd graphs)."""
        self.features.clear()


KV = tuple[torch.Tensor, torch.Tensor]  # extra (k, v) for one layer, each (B or 1, heads, M, d)


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


def _append_kv(k, v, mask, extra: KV):
    """Append extra (k, v) along the tokens of k, v and let the mask attend to them."""
    ek, ev = (x.to(k.dtype).expand(k.shape[0], -1, -1, -1) for x in extra)  # (B, heads, M, d)
    if mask is not None:
        shape = (*mask.shape[:-1], ek.shape[2])
        pad = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
        mask = torch.cat([mask, pad], dim=-1)  # (B, heads, 1 or N, S + M)
    return torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2), mask  # (B, heads, S + M, d)


def _attend(
    attn,
    hidden_states,
    encoder_hidden_states,
    attention_mask,
    temb,
    *,
    extra=None,
    rows=None,
    seen=None,
):
    """What `AttnProcessor2_0` computes, optionally also attending to `extra` (k, v) (every row)
    or to `rows` (each row its own (k, v) or None); `seen(q, k, v, out)` receives the layer's own
    q, k, v and SDPA's output."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
    if image_shape is not None:
        b, c, h, w = image_shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, N, C)
    q, k, v, mask = _project(attn, hidden_states, encoder_hidden_states, attention_mask)
    if rows is not None and any(kv is not None for kv in rows):
        out = _attend_rows(q, k, v, mask, rows)
    else:
        k_all, v_all = k, v
        if extra is not None:
            k_all, v_all, mask = _append_kv(k, v, mask, extra)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, heads, N, d)
    if seen is not None:
        seen(q, k, v, out)
    hidden_states = out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, N, heads * d)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
    if image_shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)  # (B, C, H, W)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class RecordingAttnProcessor:
    """`AttnProcessor2_0` that also stores q, k, v and SDPA's output under `name` in `store`."""

    def __init__(self, name: str, store: FeatureStore):
        self.name, self.store = name, store

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        def seen(q, k, v, out):
            self.store.features[self.name] = AttentionFeatures(q, k, v, out)

        return _attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, seen=seen)


class InjectingAttnProcessor:
    """`AttnProcessor2_0` whose queries also attend to extra tokens' (k, v) (an anchor frame's)."""

    def __init__(self, kv: KV):
        self.kv = kv

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        return _attend(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, extra=self.kv
        )


def _attend_rows(q, k, v, mask, extras: Sequence[KV | None]) -> torch.Tensor:
    """SDPA where row r also attends to its own extra (k, v) ((heads, M_r, d), or None).

    Rows with the same number of extra tokens run as one batch, so no padding mask is needed
    (a mask would send SDPA to its slow math kernel).
    """
    counts = [0 if kv is None else kv[0].shape[1] for kv in extras]
    out = torch.empty_like(q)  # (B, heads, N, d)
    for count in dict.fromkeys(counts):
        rows = [r for r, c in enumerate(counts) if c == count]
        if len(rows) == len(counts):
            rows = slice(None)  # one group: no copies
        k_r, v_r, mask_r = k[rows], v[rows], None if mask is None else mask[rows]
        if count:
            members = [kv for kv, c in zip(extras, counts, strict=True) if c == count]
            extra = tuple(torch.stack([kv[i] for kv in members]) for i in (0, 1))
            k_r, v_r, mask_r = _append_kv(k_r, v_r, mask_r, extra)  # (G, heads, S + M, d)
        out[rows] = F.scaled_dot_product_attention(q[rows], k_r, v_r, attn_mask=mask_r)
    return out


class BankAttnProcessor:
    """`AttnProcessor2_0` whose queries also attend to a feature bank's (k, v), row by row.

    `bank.extra(name)` gives each UNet row's banked (k, v) (or None) before attention;
    `bank.seen(name, k, v)` receives the layer's own k, v (B, heads, N, d) after (to store them).
    """

    def __init__(self, name: str, bank):
        self.name, self.bank = name, bank

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        extras = self.bank.extra(self.name)

        def seen(q, k, v, out):
            self.bank.seen(self.name, k, v)

        return _attend(
            attn,
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            temb,
            rows=extras,
            seen=seen,
        )


@contextmanager
def installed(unet, processors: Mapping[str, object]) -> Iterator[None]:
    """Install `processors` by layer name for the block; restore the originals after.

    diffusers raises on a partial mapping: the chosen entries replace those of the full one.
    """
    originals = unet.attn_processors
    unet.set_attn_processor({**originals, **processors})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(originals))  # set_attn_processor pops from the dict it gets


@contextmanager
def record_attention(
    unet, layers: int | str | Sequence[str] | None = None
) -> Iterator[FeatureStore]:
    """Record `layers` (see `select_layers`) in the block; restore the original processors after."""
    store = FeatureStore()
    names = select_layers(unet, layers)
    with installed(unet, {name: RecordingAttnProcessor(name, store) for name in names}):
        yield store


@contextmanager
def inject_attention(unet, kv: Mapping[str, KV]) -> Iterator[None]:
    """Let each named layer also attend to its extra (k, v) in the block (anchor attention)."""
    with installed(unet, {name: InjectingAttnProcessor(pair) for name, pair in kv.items()}):
        yield
