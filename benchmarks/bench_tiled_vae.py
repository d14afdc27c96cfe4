"""Benchmark the tiled VAE against decoding (and encoding) in one piece.

How far a tiled decode lands from the whole decode of the same latent, with each tile normalised
alone (`lockstep=False`, what stylekit did before) and with the mid block on the whole latent and
GroupNorm statistics shared over the tiles (the default), plus the time each takes; the same for
encoding. The VAE is SD1.5's KL architecture (diffusers' `AutoencoderKL` defaults with SD's
block widths) with random weights, or the tiny test VAE (`--tiny`); the latent is smooth noise.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_tiled_vae.py --sizes 512 768
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from stylekit.engine.latents import decode, encode_pixels
from stylekit.engine.tiling import _spans, decode_tiled, encode_tiled


def sd15_vae(tiny: bool):
    """SD1.5's VAE architecture (or a tiny one) with seeded random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if tiny:
        return AutoencoderKL(
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
            layers_per_block=1,
        ).eval()
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    ).eval()


def smooth(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(*shape[:2], shape[2] // 8, shape[3] // 8, generator=g)
    return F.interpolate(small, size=shape[2:], mode="bicubic")


def border_ratio(diff: np.ndarray, size: int, tile: int, overlap: int) -> float:
    """Mean difference within 8 px of tile-core borders over the mean elsewhere."""
    near = np.zeros(diff.shape, bool)
    for s in _spans(size, tile=tile, overlap=overlap, wrap=False)[1:]:
        e = 8 * (s.start + s.core_offset)
        near[e - 8 : e + 8, :] = near[:, e - 8 : e + 8] = True
    return float(diff[near].mean() / max(diff[~near].mean(), 1e-12))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--tile", type=int, default=48)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    vae = sd15_vae(args.tiny)
    model = SimpleNamespace(vae=vae, dtype=torch.float32, device=torch.device("cpu"))
    print(f"{'size':>5} {'what':<28} {'mean/255':>9} {'max/255':>8} {'border/inner':>12} {'s':>6}")
    for px in args.sizes:
        z = smooth((1, 4, px // 8, px // 8), 0)
        whole, t_whole = timed(decode, model, z)
        print(f"{px:>5} {'decode, whole':<28} {'':>9} {'':>8} {'':>12} {t_whole:6.1f}")
        for lock in (False, True):
            out, t = timed(
                decode_tiled, model, z, tile=args.tile, overlap=args.overlap, lockstep=lock
            )
            d = np.abs(out - whole)[0].max(-1) * 255
            what = "decode, shared statistics" if lock else "decode, tiles alone (before)"
            ratio = border_ratio(d, px // 8, args.tile, args.overlap)
            print(f"{px:>5} {what:<28} {d.mean():9.3f} {d.max():8.2f} {ratio:12.2f} {t:6.1f}")
        x = (smooth((1, 3, px, px), 1) * 0.5).clamp(-1, 1)
        enc_whole, t_whole = timed(encode_pixels, model, x, torch.Generator().manual_seed(2))
        enc, t = timed(
            encode_tiled,
            model,
            x,
            torch.Generator().manual_seed(2),
            tile=args.tile,
            overlap=args.overlap,
        )
        d = (enc - enc_whole).abs()
        print(
            f"{px:>5} {'encode, shared (latent diff)':<28} {float(d.mean()):9.2e} "
            f"{float(d.max()):8.2e} {'':>12} {t:6.1f}  (whole {t_whole:.1f} s)"
        )


if __name__ == "__main__":
    sys.exit(main())
