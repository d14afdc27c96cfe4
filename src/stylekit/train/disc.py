"""The adversarial side shared by STD and ADD: a frozen DINOv2 feature network, one small trainable
head per feature block (StyleGAN-T's design), and DiffAugment on both real and fake images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

HEADS = 4  # feature blocks read: the last of each quarter of the ViT (ViT-S/14: 2, 5, 8, 11)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIRTUAL_BATCH = 8  # BatchNormLocal normalises over groups of this many samples
CMAP = 64  # width of the projection space where a token meets the condition


class Features(nn.Module):
    """Frozen DINOv2: patch tokens of the chosen blocks after the final LayerNorm, as the hub's
    `get_intermediate_layers` gives them. Input pixels in [−1, 1], any size."""

    def __init__(self, dino):
        super().__init__()
        self.dino = dino.requires_grad_(False).eval()
        depth = dino.config.num_hidden_layers
        self.blocks = tuple(depth // HEADS * (i + 1) - 1 for i in range(HEADS))
        self.size = int(dino.config.image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return int(self.dino.config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = (pixels.float() + 1) / 2  # [−1, 1] → [0, 1]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        x = ((x - self.mean) / self.std).to(self.dino.dtype)
        hidden = self.dino(pixel_values=x, output_hidden_states=True).hidden_states
        norm = self.dino.layernorm
        return [norm(hidden[b + 1])[:, 1:].float() for b in self.blocks]  # (B, N, C) each


class BatchNormLocal(nn.Module):
    """Batch norm over groups of `VIRTUAL_BATCH` samples, no running statistics (StyleGAN-T)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, N)
        parts = []
        for part in x.split(VIRTUAL_BATCH):
            mean = part.mean(dim=(0, 2), keepdim=True)
            var = part.var(dim=(0, 2), keepdim=True, unbiased=False)
            parts.append((part - mean) / torch.sqrt(var + self.eps))
        return torch.cat(parts) * self.weight[:, None] + self.bias[:, None]


class Head(nn.Module):
    """Token features (B, N, C) and a condition (B, D) → one logit per token (B, N)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.inp = spectral_norm(nn.Conv1d(channels, channels, 1))
        self.norm1 = BatchNormLocal(channels)
        self.res = spectral_norm(
            nn.Conv1d(channels, channels, 9, padding=4, padding_mode="circular")
        )
        self.norm2 = BatchNormLocal(channels)
        self.out = spectral_norm(nn.Conv1d(channels, CMAP, 1))
        self.proj = nn.Linear(cond_dim, CMAP)

    def forward(self, feats: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm1(self.inp(feats.transpose(1, 2))), 0.2)  # (B, C, N)
        h = (h + F.leaky_relu(self.norm2(self.res(h)), 0.2)) / math.sqrt(2)
        h = self.out(h)  # (B, CMAP, N)
        c = self.proj(cond.float())  # (B, CMAP)
        return (h * c[:, :, None]).sum(1) / math.sqrt(CMAP)  # (B, N)


class Discriminator(nn.Module):
    """One head per feature block; logits concatenated (B, blocks · N)."""

    def __init__(self, channels: int, cond_dim: int, blocks: int = HEADS):
        super().__init__()
        self.heads = nn.ModuleList(Head(channels, cond_dim) for _ in range(blocks))

    def forward(self, feats: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(f, cond) for head, f in zip(self.heads, feats, strict=True)], dim=1)


def diff_augment(x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """DiffAugment color, translation (1/8) and cutout (1/2) per sample, each from its own
    generator (Zhao et al. 2020); differentiable in x. x: (B, 3, H, W) in [−1, 1]."""
    return torch.stack([_augment_one(xi, g) for xi, g in zip(x, generators, strict=True)])


def _augment_one(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    r = torch.rand(5, generator=g).tolist()
    x = x + (r[0] - 0.5)  # brightness
    mean = x.mean(0, keepdim=True)
    x = (x - mean) * (r[1] * 2) + mean  # saturation
    x = (x - x.mean()) * (r[2] + 0.5) + x.mean()  # contrast
    _, h, w = x.shape
    dy, dx = (torch.randint(-(n // 8), n // 8 + 1, (), generator=g).item() for n in (h, w))
    x = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))  # translation, zero fill
    x = x[:, max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]
    ch, cw = h // 2, w // 2
    cy, cx = int(r[3] * (h - ch + 1)), int(r[4] * (w - cw + 1))
    mask = torch.ones_like(x[:1])
    mask[:, cy : cy + ch, cx : cx + cw] = 0  # cutout
    return x * mask
