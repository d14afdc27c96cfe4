"""Attention-distillation guidance wired into few-step sampling (AD, arXiv 2502.20235).

After every sampler step the latent is refined with Adam against the reference's self-attention
features at the *next* timestep of the actual schedule. The reference features at a timestep depend
only on the reference, the timestep and the run's noise, so `Guide` computes them once per run and
reuses them for every image and frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from stylekit.engine import conditioning, guidance
from stylekit.engine.attention import Features, LabelMaps, select_layers
from stylekit.engine.latents import to_tensor
from stylekit.engine.models import LoadedModel
from stylekit.engine.sampling import Sampler, add_noise


@dataclass(frozen=True)
class ADOptions:
    """AD guidance knobs; defaults are the AD release's SD1.5 guided-sampling settings."""

    iters: int = 3
    lr: float = 0.015
    adain: bool = True
    content_weight: float = 0.0
    checkpointing: bool = False
    layers: int | Sequence[str] | None = None  # default: the last 6 self-attention layers


@torch.no_grad()
def clean_latent(model: LoadedModel, image: Image.Image) -> torch.Tensor:
    """The posterior mean of an image, scaled: the reference/content latent AD works with."""
    vae = model.vae
    out = vae.encode(to_tensor(image).to(model.device, vae.dtype))
    z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
    return (z * vae.config.scaling_factor).to(model.dtype)


@dataclass
class Guide:
    """AD guidance for one run: reference latents, fixed noise, cached reference features."""

    model: LoadedModel
    sampler: Sampler
    feature_cond: conditioning.Conditioning  # empty prompt, one row (no CFG)
    refs: list[torch.Tensor]  # clean reference latents (1, 4, h, w)
    ref_noise: list[torch.Tensor]
    options: ADOptions
    layers: list[str]
    masks: LabelMaps | None = None
    cache: dict[int, list[Features]] = field(default_factory=dict)  # noised refs, per t (sampling)
    clean_cache: dict[int, list[Features]] = field(default_factory=dict)  # clean refs (optimising)
    feature_passes: int = 0  # reference feature passes actually run (reused across images)

    def unet_inputs(self, z: torch.Tensor) -> dict:
        """Feature-pass UNet kwargs for a latent of this size (SDXL ids depend on the size)."""
        c = self.feature_cond
        h, w = z.shape[-2] * 8, z.shape[-1] * 8
        kwargs = {"encoder_hidden_states": c.prompt_embeds, "timestep_cond": c.timestep_cond}
        added = conditioning.added_kwargs(self.model, c, h, w)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return kwargs

    def noised_ref(self, i: int, t: int) -> torch.Tensor:
        """Reference i noised to t with the run's fixed noise."""
        return add_noise(self.refs[i], self.ref_noise[i], t, self.sampler.ac)

    def reference_features(self, t: int) -> list[Features]:
        """Features of every noised reference at t, computed once per run."""
        if t not in self.cache:
            self.cache[t] = [
                guidance.reference_features(
                    self.model.unet, self.noised_ref(i, t), t, self.unet_inputs(r), self.layers
                )
                for i, r in enumerate(self.refs)
            ]
            self.feature_passes += len(self.refs)
        return self.cache[t]

    def adain(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """Match z's channel statistics to the noised references' (all references pooled)."""
        pooled = torch.cat([self.noised_ref(i, t).flatten(2) for i in range(len(self.refs))], dim=2)
        return guidance.adain(z, pooled[:, :, None, :])  # ref as (1, C, 1, ΣHW)

    def refine(self, z: torch.Tensor, t: int, content: torch.Tensor | None = None) -> torch.Tensor:
        """One AD refinement of z at timestep t (optionally AdaIN first and a content term)."""
        o = self.options
        if o.adain:
            z = self.adain(z, t)
        if o.iters == 0:
            return z
        content_feats = None
        if content is not None and o.content_weight:
            content_feats = guidance.reference_features(
                self.model.unet, content, t, self.unet_inputs(content), self.layers
            )
        return guidance.refine(
            self.model.unet,
            z,
            t,
            self.unet_inputs(z),
            self.reference_features(t),
            layers=self.layers,
            iters=o.iters,
            lr=o.lr,
            content_feats=content_feats,
            content_weight=o.content_weight,
            masks=self.masks,
            checkpointing=o.checkpointing,
        ).x

    def after_step(
        self,
        ts: Sequence[int],
        *,
        z0: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """The sampler hook: refine after step i at t' = ts[i+1] (0 after the last step).

        With `z0` and `noise` (image-to-image) the content term compares with z0 noised to t'.
        """

        def hook(i: int, z: torch.Tensor) -> torch.Tensor:
            t_next = ts[i + 1] if i + 1 < len(ts) else 0
            content = add_noise(z0, noise, t_next, self.sampler.ac) if z0 is not None else None
            return self.refine(z, t_next, content)

        return hook


def reference_seed(seed: int) -> int:
    """The reference noise's seed, derived from the run's: never equal to an image's own seed
    (image i uses seed + i), so a reference the size of the image is never noised like it."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


def make_guide(
    model: LoadedModel,
    sampler: Sampler,
    references: Sequence[Image.Image],
    *,
    seed: int,
    options: ADOptions = ADOptions(),
    image_embeds: list[torch.Tensor] | None = None,
    masks: LabelMaps | None = None,
) -> Guide:
    """Encode the references once and draw the run's fixed reference noise from `seed`."""
    cond = conditioning.encode_text(model, "", None, cfg=1.0)
    if image_embeds is not None:  # IP-Adapter layers need image embeds in every UNet call
        cond = conditioning.Conditioning(
            cond.prompt_embeds, 1.0, cond.pooled, [e[-1:] for e in image_embeds], cond.timestep_cond
        )
    refs = [clean_latent(model, r) for r in references]
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = [
        randn_tensor(r.shape, generator=generator, device=r.device, dtype=r.dtype) for r in refs
    ]
    layers = select_layers(model.unet, options.layers)
    return Guide(model, sampler, cond, refs, noise, options, layers, masks)


def optimization_timesteps(n: int) -> list[int]:
    """n timesteps descending linearly from 999 to 1 (AD's optimisation schedule)."""
    return [int(round(999 - i * 998 / max(n - 1, 1))) for i in range(n)]


def optimize_transfer(
    guide: Guide,
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
    weight = content_weight if content is not None else 0.0
    result = guidance.optimize(
        guide.model.unet,
        start,
        guide.refs,
        optimization_timesteps(steps),
        guide.unet_inputs(start),
        z_content=content,
        content_weight=weight,
        lr=lr,
        layers=guide.layers,
        masks=guide.masks,
        checkpointing=guide.options.checkpointing,
        callback=None if callback is None else (lambda i, n, loss: callback(i + 1, n)),
        ref_cache=guide.clean_cache,
    )
    return result.x
