"""Prompt and style-image conditioning, computed once per batch (ε prediction is in `predict.py`).

Text encoding and IP-Adapter image encoding go through the diffusers pipeline's own methods, so the
embeddings are exactly what its pipelines would feed the UNet; only SDXL's size ids depend on the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from stylekit.engine.models import LoadedModel


@dataclass(frozen=True)
class Conditioning:
    """Everything the UNet needs besides the latent and timestep; uncond rows come first under CFG."""

    prompt_embeds: torch.Tensor  # (B, 77, D): B = 2 with CFG (uncond, cond), else 1
    cfg: float
    pooled: torch.Tensor | None = None  # SDXL pooled text embeds, same row layout
    image_embeds: list[torch.Tensor] | None = None  # IP-Adapter embeds, same row layout
    timestep_cond: torch.Tensor | None = None  # LCM-distilled UNets' CFG-scale (w) embedding
    time_ids: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, compare=False)

    @property
    def do_cfg(self) -> bool:
        return self.prompt_embeds.shape[0] == 2


def uses_cfg(model: LoadedModel, cfg: float) -> bool:
    """Real CFG (a second, unconditional UNet row) when g > 1 and the UNet has no CFG-scale (w) embedding."""
    return cfg > 1.0 and model.unet.config.time_cond_proj_dim is None


@torch.no_grad()
def encode_text(
    model: LoadedModel, prompt: str, negative: str | None, *, cfg: float
) -> Conditioning:
    """Encode the prompt (and the negative prompt under CFG) exactly as the diffusers pipeline does."""
    pipe, do_cfg = model.pipe, uses_cfg(model, cfg)
    if model.family == "sdxl":
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt,
            device=model.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative,
        )
    else:
        pos, neg = pipe.encode_prompt(prompt, model.device, 1, do_cfg, negative_prompt=negative)
        pooled = neg_pooled = None
    embeds = torch.cat([neg, pos]) if do_cfg else pos
    if pooled is not None and do_cfg:
        pooled = torch.cat([neg_pooled, pooled])
    return Conditioning(embeds, cfg, pooled, timestep_cond=cfg_scale_embedding(model, cfg))


def cfg_scale_embedding(model: LoadedModel, cfg: float) -> torch.Tensor | None:
    """The w-embedding fed to UNets distilled with guidance inside (full LCM models), else None."""
    dim = model.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.tensor(cfg - 1).repeat(1)
    emb = model.pipe.get_guidance_scale_embedding(w, embedding_dim=dim)
    return emb.to(device=model.device, dtype=model.unet.dtype)


@torch.no_grad()
def with_style_images(model: LoadedModel, cond: Conditioning, images: Sequence) -> Conditioning:
    """Add IP-Adapter embeddings of the style references (several references join as one adapter input)."""
    embeds = model.pipe.prepare_ip_adapter_image_embeds(
        [list(images)], None, model.device, 1, cond.do_cfg
    )
    return replace(cond, image_embeds=embeds)


def sdxl_time_ids(model: LoadedModel, cond: Conditioning, height: int, width: int) -> torch.Tensor:
    """SDXL micro-conditioning ids for an image of this size (no crop), uncond rows first."""
    key = (height, width)
    if key not in cond.time_ids:
        size = (height, width)
        if model.pipe.config.requires_aesthetics_score:
            pos, neg = [*size, 0, 0, 6.0], [*size, 0, 0, 2.5]
        else:
            pos = neg = [*size, 0, 0, *size]
        rows = [neg, pos] if cond.do_cfg else [pos]
        cond.time_ids[key] = torch.tensor(rows, dtype=cond.prompt_embeds.dtype, device=model.device)
    return cond.time_ids[key]


def added_kwargs(model: LoadedModel, cond: Conditioning, height: int, width: int) -> dict | None:
    """The UNet's `added_cond_kwargs`: SDXL text/time embeddings and IP-Adapter image embeddings."""
    added = {}
    if model.family == "sdxl":
        added["text_embeds"] = cond.pooled
        added["time_ids"] = sdxl_time_ids(model, cond, height, width)
    if cond.image_embeds is not None:
        added["image_embeds"] = cond.image_embeds
    return added or None
