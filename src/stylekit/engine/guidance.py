"""Adam refinement of latents against attention features (Attention Distillation, arXiv 2502.20235).

`refine` is the per-step guidance of AD-guided sampling (a fresh optimiser each call); `optimize` is
the optimisation-based transfer (one optimiser across a descending list of timesteps). Feature
passes use the empty-prompt conditioning, passed in by the caller, and no CFG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from stylekit.engine.attention import (
    Features,
    FeatureStore,
    LabelMaps,
    ad_loss,
    content_loss,
    record_attention,
)
from stylekit.errors import UsageError

# encoder_hidden_states alone, or UNet keyword arguments (added_cond_kwargs, timestep_cond, ...)
UNetInputs = torch.Tensor | Mapping[str, Any]
LayerSpec = int | str | Sequence[str] | None  # see attention.select_layers
Timestep = int | float | torch.Tensor


@dataclass(frozen=True)
class Refined:
    """An optimised latent and the loss of the last step (computed before that step's update)."""

    x: torch.Tensor
    loss: float


# --- feature passes ----------------------------------------------------------------------------


def _repeat(value: Any, batch: int) -> Any:
    """Repeat batch-1 tensors (also in dicts and lists) to `batch`; leave anything else as is."""
    if isinstance(value, Mapping):
        return {key: _repeat(item, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_repeat(item, batch) for item in value)
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 1 < batch:
        return value.expand(batch, *value.shape[1:])
    return value


def _unet_kwargs(cond: UNetInputs, batch: int) -> dict[str, Any]:
    """UNet keyword arguments for `cond`, its batch-1 tensors repeated to the latent batch."""
    kwargs = {"encoder_hidden_states": cond} if isinstance(cond, torch.Tensor) else dict(cond)
    return _repeat(kwargs, batch)


def _features(
    unet, store: FeatureStore, x: torch.Tensor, t: Timestep, cond: UNetInputs
) -> Features:
    """Run `unet` on latent `x` at timestep `t` and return what the recording processors stored."""
    store.clear()
    unet(x.to(unet.dtype), t, **_unet_kwargs(cond, x.shape[0]), return_dict=False)
    feats = dict(store.features)
    store.clear()
    return feats


def reference_features(
    unet, z: torch.Tensor, t: Timestep, cond: UNetInputs, layers: LayerSpec = None
) -> Features:
    """Record the attention features of latent `z` (noisy or clean) at timestep `t`, no grad."""
    with record_attention(unet, layers) as store, torch.no_grad():
        return _features(unet, store, z, t, cond)


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match x's per-channel mean and std (B, C, H, W) to ref's (AdaIN, Huang & Belongie 2017)."""
    xf, rf = x.float(), ref.float()
    x_mean, x_std = xf.mean((-2, -1), keepdim=True), xf.std((-2, -1), keepdim=True)  # (B, C, 1, 1)
    r_mean, r_std = rf.mean((-2, -1), keepdim=True), rf.std((-2, -1), keepdim=True)
    return ((xf - x_mean) / (x_std + eps) * r_std + r_mean).to(x.dtype)


# --- optimisation ------------------------------------------------------------------------------


@contextmanager
def _frozen(unet) -> Iterator[None]:
    """Keep gradients off the UNet parameters for the block: only the latent is optimised."""
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _checkpointing(unet, enabled: bool) -> Iterator[None]:
    """Turn on gradient checkpointing for the block when asked and not on already."""
    if not enabled or unet.is_gradient_checkpointing:
        yield
        return
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()


@contextmanager
def _optimising(unet, layers, checkpointing: bool) -> Iterator[FeatureStore]:
    """Frozen UNet, optional checkpointing, recording processors on `layers`, grad enabled."""
    with (
        _frozen(unet),
        _checkpointing(unet, checkpointing),
        record_attention(unet, layers) as store,
        torch.enable_grad(),
    ):
        yield store


def _objective(
    feats: Features,
    ref_feats: Features | Sequence[Features],
    content_feats: Features | None,
    *,
    content_weight: float,
    attn_scale: float,
    masks: LabelMaps | None,
) -> torch.Tensor:
    """ad_loss(feats, refs) + content_weight * content_loss(feats, content)."""
    loss = ad_loss(feats, ref_feats, attn_scale=attn_scale, masks=masks)
    if content_feats is not None and content_weight:
        loss = loss + content_weight * content_loss(feats, content_feats)
    return loss


def _step(
    unet,
    store: FeatureStore,
    opt: torch.optim.Optimizer,
    z: torch.Tensor,
    t: Timestep,
    cond: UNetInputs,
    objective: Callable[[Features], torch.Tensor],
) -> float:
    """One Adam step on latent `z` against `objective` of its features at `t`; return the loss."""
    loss = objective(_features(unet, store, z, t, cond))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    store.clear()  # a checkpointed backward records again
    opt.step()
    return loss.item()


@torch.no_grad()
def _goals(
    unet,
    store: FeatureStore,
    refs: Sequence[torch.Tensor],
    z_content: torch.Tensor | None,
    content_weight: float,
    t: Timestep,
    cond: UNetInputs,
    ref_cache: dict | None = None,
) -> tuple[list[Features], Features | None]:
    """Features of the reference latents and, when weighted, of the content latent at `t`.

    The clean references' features depend only on t: with a `ref_cache` they are computed once
    per run and reused for every image.
    """
    key = int(t)
    if ref_cache is not None and key in ref_cache:
        ref_feats = ref_cache[key]
    else:
        ref_feats = [_features(unet, store, r, t, cond) for r in refs]
        if ref_cache is not None:
            ref_cache[key] = ref_feats
    if z_content is None or not content_weight:
        return ref_feats, None
    return ref_feats, _features(unet, store, z_content, t, cond)


def _check_content(content: object, content_weight: float, name: str) -> None:
    if content_weight and content is None:
        raise UsageError(f"content_weight {content_weight} needs {name}")


def _layers_of(ref_feats: Features | Sequence[Features]) -> list[str]:
    return list(ref_feats if isinstance(ref_feats, Mapping) else ref_feats[0])


def refine(
    unet,
    x: torch.Tensor,
    t: Timestep,
    cond: UNetInputs,
    ref_feats: Features | Sequence[Features],
    *,
    layers: LayerSpec = None,
    iters: int = 3,
    lr: float = 0.015,
    content_feats: Features | None = None,
    content_weight: float = 0.0,
    masks: LabelMaps | None = None,
    attn_scale: float = 1.0,
    checkpointing: bool = False,
) -> Refined:
    """Take `iters` steps of a fresh Adam on a copy of latent `x` that lower the AD loss at `t`.

    Defaults are the AD release's SD1.5 guidance (lr 0.015, 3 iterations); `layers` defaults to
    those of `ref_feats`. The result is detached, in `x`'s dtype.
    """
    _check_content(content_feats, content_weight, "content_feats")
    z = x.detach().float().clone().requires_grad_(True)  # fp32 leaf, whatever the UNet dtype
    opt = torch.optim.Adam([z], lr=lr)
    objective = partial(
        _objective,
        ref_feats=ref_feats,
        content_feats=content_feats,
        content_weight=content_weight,
        attn_scale=attn_scale,
        masks=masks,
    )
    loss = float("nan")
    layers = _layers_of(ref_feats) if layers is None else layers
    with _optimising(unet, layers, checkpointing) as store:
        for _ in range(iters):
            loss = _step(unet, store, opt, z, t, cond, objective)
    return Refined(z.detach().to(x.dtype), loss)


def optimize(
    unet,
    z: torch.Tensor,
    z_ref: torch.Tensor | Sequence[torch.Tensor],
    timesteps: Iterable[Timestep],
    cond: UNetInputs,
    *,
    z_content: torch.Tensor | None = None,
    content_weight: float = 0.0,
    lr: float = 0.05,
    layers: LayerSpec = None,
    masks: LabelMaps | None = None,
    attn_scale: float = 1.0,
    checkpointing: bool = False,
    callback: Callable[[int, int, float], None] | None = None,
    ref_cache: dict | None = None,
) -> Refined:
    """Optimisation-based AD transfer: one Adam on latent `z`, one step per descending timestep.

    At each t the clean latents `z_ref` (one or several references) and `z_content` give the
    features (no grad); `callback(i, n, loss)` follows every step. lr 0.05 is the AD release's.
    """
    _check_content(z_content, content_weight, "z_content")
    refs = [z_ref] if isinstance(z_ref, torch.Tensor) else list(z_ref)
    timesteps = list(timesteps)
    latent = z.detach().float().clone().requires_grad_(True)  # fp32 leaf
    opt = torch.optim.Adam([latent], lr=lr)
    loss = float("nan")
    with _optimising(unet, layers, checkpointing) as store:
        for i, t in enumerate(timesteps):
            ref_feats, content = _goals(
                unet, store, refs, z_content, content_weight, t, cond, ref_cache
            )
            objective = partial(
                _objective,
                ref_feats=ref_feats,
                content_feats=content,
                content_weight=content_weight,
                attn_scale=attn_scale,
                masks=masks,
            )
            loss = _step(unet, store, opt, latent, t, cond, objective)
            if callback is not None:
                callback(i, len(timesteps), loss)
    return Refined(latent.detach().to(z.dtype), loss)
