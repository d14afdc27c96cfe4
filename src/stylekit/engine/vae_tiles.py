"""A KL VAE's decoder run tile by tile so that it agrees with decoding the whole latent at once.

Two parts of the decoder see more than a neighbourhood: the mid block's self-attention (every
latent position) and every GroupNorm (mean and variance over the whole image). Run on one tile,
they see only the tile, and tiles come out with their own colour and contrast ("visible tiles").

- `decode_mid` runs post_quant_conv, conv_in and the mid block on the whole latent (it has 64
  times fewer positions than the image), as long as that fits (`WHOLE_MID_TOKENS`).
- `decode_up_tiles` then runs the rest (up blocks, output norm, conv_out: convolutions and
  GroupNorms, no attention) on crops of the mid block's output, all tiles in step: at each
  GroupNorm, the statistics of every group are accumulated over the *core* of every tile (each
  position once), then every tile is normalised with those shared statistics, the two passes per
  GroupNorm of the Tiled VAE of the multidiffusion-upscaler project. Convolutions see `overlap`
  latents of context around each core, as before.

All tiles are alive at once at each layer, so memory is about one image's activations at one
layer (`lockstep_bytes`), not one tile's; the caller falls back to independent tiles above its
budget. See docs/multidiffusion.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Latent positions up to which the mid block runs on the whole latent (a 2048² px image for an
# 8× VAE): its attention over 65k positions costs about one minute on 2 CPU cores, seconds on a
# GPU. Larger canvases run the whole decoder per tile.
WHOLE_MID_TOKENS = 256 * 256

Region = tuple[float, float, float, float]  # a tile's core: top, bottom, left, right as fractions


def encoder_splits(vae) -> bool:
    """Whether the VAE's encoder has diffusers' AutoencoderKL layout (conv_in, down blocks of
    plain resnets and downsamplers, mid block, norm, conv_out) that `encode_down_tiles` runs."""
    encoder = getattr(vae, "encoder", None)
    names = ("conv_in", "down_blocks", "mid_block", "conv_norm_out", "conv_act", "conv_out")
    if encoder is None or not all(hasattr(encoder, n) for n in names):
        return False
    resnets = [r for block in encoder.down_blocks for r in getattr(block, "resnets", [])]
    return all(
        r.upsample is None and r.downsample is None and r.time_emb_proj is None for r in resnets
    )


def encode_down_tiles(
    vae, tiles: list[torch.Tensor], cores: Sequence[Region]
) -> list[torch.Tensor]:
    """The encoder up to its mid block on every (1, 3, H, W) pixel tile, in step, GroupNorm
    statistics shared over the tiles' cores: one (1, C, h, w) feature map per tile."""
    encoder = vae.encoder
    tiles = [encoder.conv_in(t) for t in tiles]
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            tiles = _resnet(resnet, tiles, cores)
        for downsampler in block.downsamplers or ():
            tiles = [downsampler(t) for t in tiles]
    return tiles


def encode_rest(vae, h: torch.Tensor) -> torch.Tensor:
    """The encoder from its mid block on the whole (1, C, h, w) feature map, then quant_conv:
    the posterior's moments (1, 2·latent channels, h, w)."""
    encoder = vae.encoder
    h = encoder.mid_block(h)
    h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h)))
    if getattr(vae, "quant_conv", None) is not None:
        h = vae.quant_conv(h)
    return h


def splits_at_mid(vae) -> bool:
    """Whether the VAE's decoder has the layout `decode_mid`/`decode_up_tiles` split: diffusers'
    AutoencoderKL decoder (conv_in, mid block, up blocks of plain resnets, norm, conv_out)."""
    decoder = getattr(vae, "decoder", None)
    names = ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")
    if decoder is None or not all(hasattr(decoder, n) for n in names):
        return False
    resnets = [r for block in decoder.up_blocks for r in getattr(block, "resnets", [])]
    return all(
        r.upsample is None and r.downsample is None and r.time_emb_proj is None for r in resnets
    )


def decode_mid(vae, z: torch.Tensor) -> torch.Tensor:
    """post_quant_conv, conv_in and the mid block of an unscaled (1, C, h, w) latent: (1, C', h, w)."""
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    decoder = vae.decoder
    h = decoder.mid_block(decoder.conv_in(z), None)
    return h.to(next(iter(decoder.up_blocks.parameters())).dtype)


def lockstep_bytes(vae, height: int, width: int) -> int:
    """About what `decode_up_tiles` holds at its widest layer for a (height, width) latent: three
    full-resolution activations of the last up block (input, hidden, output), in the VAE's dtype."""
    decoder = vae.decoder
    channels = decoder.conv_norm_out.num_channels
    scale = 2 ** sum(1 for block in decoder.up_blocks if block.upsamplers is not None)
    itemsize = torch.finfo(vae.dtype).bits // 8
    return 3 * channels * height * width * scale * scale * itemsize


def decode_up_tiles(vae, tiles: list[torch.Tensor], cores: Sequence[Region]) -> list[torch.Tensor]:
    """The decoder after its mid block on every tile of `decode_mid`'s output, in step, with
    GroupNorm statistics shared over the tiles' cores: one (1, 3, H, W) image per tile."""
    decoder = vae.decoder
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            tiles = _resnet(resnet, tiles, cores)
        for upsampler in block.upsamplers or ():
            tiles = [upsampler(t) for t in tiles]
    tiles = shared_group_norm(decoder.conv_norm_out, tiles, cores)
    return [decoder.conv_out(decoder.conv_act(t)) for t in tiles]


def _resnet(block, tiles: list[torch.Tensor], cores: Sequence[Region]) -> list[torch.Tensor]:
    """diffusers' ResnetBlock2D without a time embedding, every GroupNorm shared by the tiles."""
    hidden = [block.nonlinearity(t) for t in shared_group_norm(block.norm1, tiles, cores)]
    hidden = [block.conv1(h) for h in hidden]
    hidden = [block.nonlinearity(h) for h in shared_group_norm(block.norm2, hidden, cores)]
    hidden = [block.conv2(block.dropout(h)) for h in hidden]
    if block.conv_shortcut is not None:
        tiles = [block.conv_shortcut(t) for t in tiles]
    return [(t + h) / block.output_scale_factor for t, h in zip(tiles, hidden, strict=True)]


def shared_group_norm(
    norm: nn.GroupNorm, tiles: list[torch.Tensor], cores: Sequence[Region]
) -> list[torch.Tensor]:
    """Normalise every (1, C, h, w) tile with its groups' mean and variance over all tiles' cores.

    A tile's core scales with the layer's resolution (the tiles' shapes say by how much);
    statistics are summed in float64 so many tiles lose nothing.
    """
    groups = norm.num_groups
    total = squares = 0.0
    count = 0
    for tile, core in zip(tiles, cores, strict=True):
        part = _core(tile, core).double().reshape(groups, -1)  # (G, C/G · h · w)
        total, squares, count = (
            total + part.sum(1),
            squares + part.square().sum(1),
            count + part.shape[1],
        )
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0)
    return [_normalise(norm, t, mean, var) for t in tiles]


def _core(tile: torch.Tensor, core: Region) -> torch.Tensor:
    """The core of a (1, C, h, w) tile at this layer's resolution (fractions of its extent)."""
    h, w = tile.shape[-2:]
    top, bottom, left, right = core
    return tile[..., round(top * h) : round(bottom * h), round(left * w) : round(right * w)]


def _normalise(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
    """GroupNorm of a (1, C, h, w) tensor with given (G,) statistics, then its affine map."""
    c, groups = x.shape[1], norm.num_groups
    xg = x.float().reshape(1, groups, c // groups, *x.shape[2:])  # (1, G, C/G, h, w)
    shape = (1, groups, 1, 1, 1)
    y = (xg - mean.float().reshape(shape)) / torch.sqrt(var.float().reshape(shape) + norm.eps)
    y = y.reshape(x.shape)
    if norm.affine:
        y = y * norm.weight.float()[None, :, None, None] + norm.bias.float()[None, :, None, None]
    return y.to(x.dtype)
