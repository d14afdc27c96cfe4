"""Attention distillation as guidance: Adam refinement of latents against reference features.

AD (Zhou et al., CVPR 2025, arXiv 2502.20235), explained in docs/attention-distillation.md:

- `refine`: a fresh Adam for a few iterations on a copy of a latent at one timestep; guided
  sampling calls it after every sampler step (`guidance` builds that `after_step` hook).
- `optimize`: optimisation-based transfer, one Adam across a descending timestep grid.
- `References` are a run's style references (clean latents, fixed noise, layers, feature-pass
  conditioning); `FeatureCache` holds their features per timestep, owned by the run, so they are
  computed once per run and reused for every image, frame and window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from stylekit.engine import conditioning, memory
from stylekit.engine.ad_loss import LabelMaps, ad_loss, content_loss
from stylekit.engine.attention import Features, FeatureStore, record_attention, select_layers
from stylekit.engine.controlnet import Control
from stylekit.engine.latents import encode_pixels, to_tensor
from stylekit.engine.models import LoadedModel
from stylekit.engine.sampling import AfterStep, add_noise
from stylekit.engine.tiling import View, crop, map_windows
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


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Match x's per-channel mean and std (B, C, H, W) to ref's (AdaIN, Huang & Belongie 2017).

    eps 1e-6 is the AD release's."""
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
    """One Adam step on latent `z` against `objective` of its features at `t`; return the loss.

    The losses are means over the batch too: scaled by the rows, each row's gradient is what it
    would be alone, so a row's result does not depend on the rows refined with it (Adam's eps
    would otherwise see a gradient 1/B as large)."""
    loss = objective(_features(unet, store, z, t, cond))
    opt.zero_grad(set_to_none=True)
    (loss * z.shape[0]).backward()
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


# --- a run's references ------------------------------------------------------------------------


@dataclass(frozen=True)
class ADOptions:
    """AD guidance knobs; defaults are the AD release's SD1.5 guided-sampling settings."""

    iters: int = 3
    lr: float = 0.015
    adain: bool = True
    content_weight: float = 0.0
    checkpointing: bool | None = None  # None: decided by `memory_plan` from free device memory
    layers: int | Sequence[str] | None = None  # default: the last 6 self-attention layers


@dataclass(frozen=True)
class References:
    """A run's AD references: clean latents (1, C, h, w), the run's fixed noise for each, the
    recorded layers and the feature passes' conditioning (empty prompt, no CFG)."""

    latents: list[torch.Tensor]
    noise: list[torch.Tensor]
    layers: list[str]
    cond: conditioning.Conditioning
    options: ADOptions
    masks: LabelMaps | None = None


@dataclass
class FeatureCache:
    """Reference features per timestep: noised (guided sampling) and clean (optimisation); and
    the run's memory plan per latent shape, decided once so every batch of a shape runs alike."""

    noised: dict[int, list[Features]] = field(default_factory=dict)
    clean: dict[int, list[Features]] = field(default_factory=dict)
    passes: int = 0  # reference feature passes actually run
    plans: dict[tuple[int, ...], MemoryPlan] = field(default_factory=dict)


# --- memory ------------------------------------------------------------------------------------

# Activations of one AD step per latent token come from `engine.memory` (UNET_GRAD, and
# UNET_GRAD_CHECKPOINTED with checkpointing), measured by benchmarks/bench_ad_memory.py; SDXL 1024²,
# one image, is estimated at 6.5 GiB without checkpointing and 1.9 GiB with it (measured 6.2, 1.3).
MEMORY_HEADROOM = 0.8  # plan within this share of free memory: allocator slack, sampler tensors


@dataclass(frozen=True)
class MemoryPlan:
    """How AD refines a batch: rows per refinement, checkpointing, and the bytes that needs."""

    checkpointing: bool
    micro_batch: int
    estimate: int


def ad_memory_estimate(
    family: str, tokens: int, *, rows: int, checkpointing: bool, dtype_bytes: int = 2
) -> int:
    """Bytes an AD refinement of `rows` latents of `tokens` (h·w) each needs over the model.

    An unknown family gets SDXL's figures (the larger without checkpointing)."""
    table = memory.UNET_GRAD_CHECKPOINTED if checkpointing else memory.UNET_GRAD
    per_token = table.get(family, table["sdxl"])
    return int(per_token * tokens * rows * dtype_bytes / 2)


def memory_plan(
    free: int | None,
    family: str,
    tokens: int,
    rows: int,
    *,
    dtype_bytes: int = 2,
    checkpointing: bool | None = None,
) -> MemoryPlan:
    """The cheapest way to refine `rows` latents that fits `free` bytes (with headroom).

    Tried in order, the first whose estimate fits: all rows at once without checkpointing, one
    row at a time without (a little slower on a GPU), all rows with checkpointing (one more
    forward per step), one row at a time with it (the last also when nothing fits).
    `checkpointing` True/False keeps only the plans with it on/off; `free` None (unknown) takes
    the first plan."""
    ladder = [(False, rows), (False, 1), (True, rows), (True, 1)]
    if checkpointing is not None:
        ladder = [plan for plan in ladder if plan[0] == checkpointing]
    plans = [
        MemoryPlan(
            ck,
            batch,
            ad_memory_estimate(
                family, tokens, rows=batch, checkpointing=ck, dtype_bytes=dtype_bytes
            ),
        )
        for ck, batch in dict.fromkeys(ladder)
    ]
    budget = None if free is None else free * MEMORY_HEADROOM
    return next((p for p in plans if budget is None or p.estimate <= budget), plans[-1])


def plan_for(
    model: LoadedModel, refs: References, cache: FeatureCache, z: torch.Tensor
) -> MemoryPlan:
    """The run's memory plan for latents shaped like `z` (B, C, h, w), decided on first use."""
    key = tuple(z.shape)
    if key not in cache.plans:
        cache.plans[key] = memory_plan(
            memory.available(model.device),
            model.family,
            z.shape[-2] * z.shape[-1],
            z.shape[0],
            dtype_bytes=model.unet.dtype.itemsize,
            checkpointing=refs.options.checkpointing,
        )
    return cache.plans[key]


def clean_latent(model: LoadedModel, image: Image.Image) -> torch.Tensor:
    """The posterior mean of an image, scaled: the reference/content latent AD works with.

    Encoded like every other image (`encode_pixels`: fp32 for an SDXL VAE in fp16), only the
    posterior's mean instead of a sample."""
    return encode_pixels(model, to_tensor(image), sample=False)


def make_references(
    model: LoadedModel,
    images: Sequence[Image.Image],
    *,
    noise: torch.Generator,
    options: ADOptions = ADOptions(),
    image_embeds: list[torch.Tensor] | None = None,
    masks: LabelMaps | None = None,
    cond: conditioning.Conditioning | None = None,
) -> References:
    """Encode the references once and draw their fixed noise from the `noise` generator.

    The caller owns that generator: it must not be an image's own (with equal shapes the image
    would be noised like the reference and pulled towards a copy of its layout). `cond` is the
    feature passes' conditioning (`feature_conditioning`), made here when not given.
    """
    cond = cond if cond is not None else feature_conditioning(model, image_embeds)
    latents = [clean_latent(model, r) for r in images]
    drawn = [
        randn_tensor(z.shape, generator=noise, device=z.device, dtype=z.dtype) for z in latents
    ]
    layers = select_layers(model.unet, options.layers)
    return References(latents, drawn, layers, cond, options, masks)


def feature_conditioning(
    model: LoadedModel, image_embeds: list[torch.Tensor] | None = None
) -> conditioning.Conditioning:
    """The feature passes' conditioning: the empty prompt, one row, no CFG; IP-Adapter layers
    need image embeds in every UNet call, so they get the conditional row's."""
    cond = conditioning.encode_text(model, "", None, cfg=1.0)
    if image_embeds is None:
        return cond
    embeds = [e[-1:] for e in image_embeds]
    return conditioning.Conditioning(
        cond.prompt_embeds, 1.0, cond.pooled, embeds, cond.timestep_cond
    )


def unet_inputs(model: LoadedModel, refs: References, z: torch.Tensor) -> dict:
    """Feature-pass UNet kwargs for a latent of this size (SDXL ids depend on the size)."""
    c = refs.cond
    kwargs = {"encoder_hidden_states": c.prompt_embeds, "timestep_cond": c.timestep_cond}
    added = conditioning.added_kwargs(model, c, z.shape[-2] * 8, z.shape[-1] * 8)
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    return kwargs


def noised(refs: References, i: int, t: int, ac: torch.Tensor) -> torch.Tensor:
    """Reference i noised to t with the run's fixed noise."""
    return add_noise(refs.latents[i], refs.noise[i], t, ac)


def noised_features(
    model: LoadedModel, refs: References, cache: FeatureCache, t: int, ac: torch.Tensor
) -> list[Features]:
    """Features of every noised reference at t, computed once per run (`cache`)."""
    if t not in cache.noised:
        cache.noised[t] = [
            reference_features(
                model.unet, noised(refs, i, t, ac), t, unet_inputs(model, refs, z), refs.layers
            )
            for i, z in enumerate(refs.latents)
        ]
        cache.passes += len(refs.latents)
    return cache.noised[t]


def adain_to(refs: References, z: torch.Tensor, t: int, ac: torch.Tensor) -> torch.Tensor:
    """Match z's channel statistics to the noised references' (all references pooled).

    With label maps each target label's region of z is matched to the same label's region of
    the references (regions of fewer than 2 latents, or a label no reference has, keep the
    match to all references)."""
    pooled = torch.cat([noised(refs, i, t, ac).flatten(2) for i in range(len(refs.latents))], 2)
    out = adain(z, pooled[:, :, None, :])  # ref as (1, C, 1, ΣHW)
    if refs.masks is None:
        return out
    target = _labels_on(refs.masks.target, z.shape[-2:])  # (h·w,)
    source = torch.cat(
        [
            _labels_on(m, r.shape[-2:])
            for m, r in zip(refs.masks.references, refs.latents, strict=True)
        ]
    )  # (ΣHW,)
    flat = out.flatten(2)  # (B, C, h·w), a view of out
    for label in target.unique():
        here, there = target == label, source == label
        if here.sum() < 2 or there.sum() < 2:
            continue
        matched = adain(z.flatten(2)[:, :, None, here], pooled[:, :, None, there])
        flat[:, :, here] = matched[:, :, 0]
    return out


def _labels_on(label_map: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (H, W) label map nearest-resized to a latent's (h, w) grid: (h·w,) labels."""
    grid = F.interpolate(label_map[None, None].float(), size=tuple(size), mode="nearest")
    return grid.flatten()


def refine_at(
    model: LoadedModel,
    refs: References,
    cache: FeatureCache,
    z: torch.Tensor,
    t: int,
    ac: torch.Tensor,
    content: torch.Tensor | None = None,
    control: Control | None = None,
) -> torch.Tensor:
    """One AD refinement of z at timestep t (AdaIN first when on, and a content term when given).

    With `control` the refined latent's UNet passes get the ControlNets' residuals at t, as the
    sampling passes do (otherwise the guidance would pull against the control); they are
    computed once from the latent entering the refinement and held over its iterations."""
    o = refs.options
    if o.adain:
        z = adain_to(refs, z, t, ac)
    if o.iters == 0:
        return z
    plan = plan_for(model, refs, cache, z)
    if content is None or not o.content_weight:
        content = None
    residuals = control_residuals(model, refs, control, z, t)
    rows = z.split(plan.micro_batch)
    contents = content.split(plan.micro_batch) if content is not None else [None] * len(rows)
    refined = [
        _refine_rows(
            model,
            refs,
            cache,
            zi,
            t,
            ac,
            ci,
            checkpointing=plan.checkpointing,
            residuals=rows_of_residuals(residuals, k * plan.micro_batch, zi.shape[0]),
        )
        for k, (zi, ci) in enumerate(zip(rows, contents, strict=True))
    ]
    return torch.cat(refined)


@torch.no_grad()
def control_residuals(
    model: LoadedModel, refs: References, control: Control | None, z: torch.Tensor, t: int
) -> dict:
    """The ControlNets' residual keywords for latent z at t under the feature passes' text."""
    if control is None:
        return {}
    inputs = _unet_kwargs(unet_inputs(model, refs, z), z.shape[0])
    hidden, added = inputs["encoder_hidden_states"], inputs.get("added_cond_kwargs")
    return control.residuals(z, t, hidden, added)


def rows_of_residuals(residuals: dict, start: int, count: int) -> dict:
    """Rows start..start+count of every residual (a micro-batch's share)."""

    def part(x: torch.Tensor) -> torch.Tensor:
        return x[start : start + count]

    return {
        k: [part(x) for x in v] if isinstance(v, list) else part(v) for k, v in residuals.items()
    }


def _refine_rows(
    model: LoadedModel,
    refs: References,
    cache: FeatureCache,
    z: torch.Tensor,
    t: int,
    ac: torch.Tensor,
    content: torch.Tensor | None,
    *,
    checkpointing: bool,
    residuals: dict | None = None,
) -> torch.Tensor:
    """`refine` rows of z against the noised references (and their content latents when given)."""
    o = refs.options
    content_feats = None
    if content is not None:
        inputs = unet_inputs(model, refs, content)
        content_feats = reference_features(model.unet, content, t, inputs, refs.layers)
    return refine(
        model.unet,
        z,
        t,
        unet_inputs(model, refs, z) | (residuals or {}),
        noised_features(model, refs, cache, t, ac),
        layers=refs.layers,
        iters=o.iters,
        lr=o.lr,
        content_feats=content_feats,
        content_weight=o.content_weight,
        masks=refs.masks,
        checkpointing=checkpointing,
    ).x


def next_timestep(ts: Sequence[int], i: int) -> int:
    """The timestep after step i: AD refines at the next timestep of the schedule (0 at the end)."""
    return ts[i + 1] if i + 1 < len(ts) else 0


def guidance(
    model: LoadedModel,
    refs: References,
    cache: FeatureCache,
    ts: Sequence[int],
    ac: torch.Tensor,
    *,
    z0: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    control: Control | None = None,
) -> AfterStep:
    """The sampling loop's `after_step`: refine after step i at t' = ts[i+1] (0 after the last).

    With `z0` and `noise` (image-to-image) the content term compares with z0 noised to t'.
    With `control` the refinement's passes get the ControlNets' residuals (`refine_at`).
    """

    def after_step(i: int, z: torch.Tensor) -> torch.Tensor:
        t = next_timestep(ts, i)
        content = add_noise(z0, noise, t, ac) if z0 is not None else None
        return refine_at(model, refs, cache, z, t, ac, content, control)

    return after_step


def windowed_guidance(
    model: LoadedModel,
    refs: References,
    cache: FeatureCache,
    ts: Sequence[int],
    ac: torch.Tensor,
    windows: Sequence[View],
    *,
    view_batch: int,
    z0: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    control: Control | None = None,
) -> AfterStep:
    """`guidance` for a MultiDiffusion canvas: refine each window, average where they overlap.

    With label maps the windows refine one at a time, each with its crop of the target map (the
    references' maps stay whole), so the AD mask pairs that window's tokens with the references'.
    With `z0` and `noise` (image-to-image) a window's content term is its crop of z0 noised to t'.
    With `control` each window's passes get the residuals of its crop of the control images.
    """
    masks = refs.masks

    def after_step(i: int, z: torch.Tensor) -> torch.Tensor:
        t, c = next_timestep(ts, i), z.shape[1]
        wanted = z0 is not None and refs.options.content_weight
        content = add_noise(z0, noise, t, ac) if wanted else None
        stacked = z if content is None else torch.cat([z, content], 1)  # (N, C or 2C, H, W)

        def refine_windows(crops: torch.Tensor, batch: Sequence[View]) -> torch.Tensor:
            own = refs if masks is None else replace(refs, masks=window_masks(masks, batch[0], z))
            ctl = control.crop(batch) if control is not None else None
            if content is None:
                return refine_at(model, own, cache, crops, t, ac, control=ctl)
            part = crops[:, c:].contiguous()  # (B, C, h, w) each
            refined = refine_at(model, own, cache, crops[:, :c].contiguous(), t, ac, part, ctl)
            return torch.cat([refined, part], 1)

        out = map_windows(
            refine_windows,
            stacked,
            windows,
            view_batch=1 if masks is not None else view_batch,
            pass_views=True,
        )
        return out[:, :c]

    return after_step


def window_masks(masks: LabelMaps, view: View, z: torch.Tensor) -> LabelMaps:
    """The label maps of one window of canvas `z`: the target map's crop under `view` (scaled
    from latents to the map's resolution, wrapping like the window), the references' maps whole."""
    (mh, mw), (h, w) = masks.target.shape[-2:], z.shape[-2:]
    fy, fx = mh / h, mw / w
    scaled = View(
        round(view.top * fy), round(view.left * fx), round(view.height * fy), round(view.width * fx)
    )
    return LabelMaps(crop(masks.target, scaled), masks.references)


def leading_timesteps(n: int, train_steps: int = 1000) -> list[int]:
    """AD's optimisation grid, DDIM "leading" spacing descending: arange(n)·(1000 // n) + 1 reversed.

    For n = 300 it runs 898, 895, …, 1 (not from 999), as the AD release does.
    """
    if not 1 <= n <= train_steps:
        raise UsageError(f"--opt-steps {n} is outside 1..{train_steps}")
    return [int(t) for t in (np.arange(n) * (train_steps // n) + 1)[::-1]]


def optimize_transfer(
    model: LoadedModel,
    refs: References,
    cache: FeatureCache,
    start: torch.Tensor,
    *,
    steps: int,
    lr: float = 0.05,
    content: torch.Tensor | None = None,
    content_weight: float = 0.25,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Optimisation-based transfer: one Adam on the latent over `steps` descending timesteps.

    `start` is the content latent (style/appearance transfer) or noise (texture synthesis); the
    references and content are compared clean, as in the AD release.
    """
    result = optimize(
        model.unet,
        start,
        refs.latents,
        leading_timesteps(steps),
        unet_inputs(model, refs, start),
        z_content=content,
        content_weight=content_weight if content is not None else 0.0,
        lr=lr,
        layers=refs.layers,
        masks=refs.masks,
        checkpointing=plan_for(model, refs, cache, start).checkpointing,
        callback=None if callback is None else (lambda i, n, loss: callback(i + 1, n)),
        ref_cache=cache.clean,
    )
    return result.x
