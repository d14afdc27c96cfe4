"""Cost of one ControlNet on a full-size SD1.5: stylize time per image with and without control.

The UNet and the ControlNet have SD1.5's real architectures (859 M and 361 M parameters) with
random weights (the ControlNet's zero convolutions filled with noise): quality means nothing,
cost is real. Both settings run in one process on one loaded model, interleaved round by round,
on the same images, so machine noise hits both alike.

    python benchmarks/bench_control.py             # full run (a few minutes on 2 cores)
    python benchmarks/bench_control.py --tiny      # smoke test on a tiny model (seconds)

4 images at 256 px, LCM, 4 NFE at strength 0.6, no CFG, bf16, CPU, tiny VAE (TAESD
architecture, so the UNet and ControlNet dominate), a precomputed canny-like map. Reported:
time per image with / without the control, the UNet and ControlNet evaluations per image (latent
rows counted with forward hooks, machine-independent), one ControlNet forward over one UNet
forward, and so the forward-equivalents per image: UNet evaluations + ControlNet evaluations ×
that ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stylekit.presets import Settings
from stylekit.session import Runtime, Session, open_session
from stylekit.testing import build_controlnet, build_sd15

CACHE = Path(__file__).parent / ".cache"
NFE, STRENGTH, SIZE, IMAGES = 4, 0.6, 256, 4


def models(tiny: bool) -> tuple[Path, Path, Path]:
    """Build (once) the random SD1.5, its ControlNet and a TAESD-architecture tiny VAE."""
    from diffusers import AutoencoderTiny

    name = "sd15-tiny" if tiny else "sd15-full"
    model, net, taesd = CACHE / name, CACHE / f"{name}-controlnet", CACHE / f"{name}-taesd"
    if not (model / "model_index.json").exists():
        build_sd15(model, size="tiny" if tiny else "full", dtype=torch.bfloat16)
    if not (net / "config.json").exists():
        channels = (8, 8, 8, 8) if tiny else (16, 32, 96, 256)  # SD1.5 ControlNets' embedding
        build_controlnet(model, net, embedding_channels=channels, dtype=torch.bfloat16, std=0.02)
    if not (taesd / "config.json").exists():
        torch.manual_seed(0)
        small = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
        AutoencoderTiny(**(small if tiny else {})).to(torch.bfloat16).save_pretrained(taesd)
    return model, net, taesd


def images(size: int) -> tuple[list[Image.Image], Image.Image]:
    """Content images (noise) and one edge-like map (a white rectangle outline on black)."""
    rng = np.random.RandomState(0)
    content = [
        Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)) for _ in range(IMAGES)
    ]
    edges = np.zeros((size, size, 3), np.uint8)
    edges[size // 4 : 3 * size // 4, size // 4] = edges[size // 4, size // 4 : 3 * size // 4] = 255
    return content, Image.fromarray(edges)


def counted(module) -> tuple[list[int], object]:
    """The latent rows of every forward of `module` (an evaluation per image per row)."""
    rows: list[int] = []
    return rows, module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))


def forward_ratio(session, size: int, repeats: int = 3) -> float:
    """One ControlNet forward over one UNet forward (batch 1, median of `repeats`)."""
    unet, net = session.model.unet, session.controls[0].net
    dtype = session.model.dtype
    x = torch.randn(1, 4, size // 8, size // 8, dtype=dtype)
    e = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=dtype)
    c = torch.rand(1, 3, size, size, dtype=dtype)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.no_grad():
        t_net = timed(lambda: net(x, 500, encoder_hidden_states=e, controlnet_cond=c))
        t_unet = timed(lambda: unet(x, 500, encoder_hidden_states=e))
    return t_net / t_unet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model smoke test")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model, net, taesd = models(args.tiny)
    size = 64 if args.tiny else SIZE
    plain = Settings(
        model=str(model),
        accelerator="none",
        scheduler="lcm",
        steps=NFE,
        strength=STRENGTH,
        cfg=1.0,
        prompt="an oil painting",
        style_mode="none",
        tiny_vae_model=str(taesd),
    )
    control = replace(
        plain, controls=("canny:0.8",), controlnets=(str(net),), control_image="map.png"
    )
    runtime = Runtime(device="cpu", dtype="bf16")
    content, edges = images(size)
    session = open_session(control, runtime)
    # the same loaded model, sampler and prompt without the control: only the control differs
    plain_session = Session(plain, session.model, session.sampler, session.cond)
    seeds = list(range(IMAGES))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {IMAGES} images "
        f"{size}px, NFE {NFE}, bf16, tiny VAE",
        flush=True,
    )

    def run(s, given) -> float:
        start = time.perf_counter()
        s.img2img(content, seeds, given=given)
        return (time.perf_counter() - start) / IMAGES

    unet_rows, h1 = counted(session.model.unet)
    net_rows, h2 = counted(session.controls[0].net)
    run(session, [edges] * IMAGES)  # warm-up, and the evaluations of one batch
    per_image_unet, per_image_net = sum(unet_rows) / IMAGES, sum(net_rows) / IMAGES
    h1.remove(), h2.remove()
    run(plain_session, None)
    with_control, without = [], []
    for r in range(args.rounds):
        with_control.append(run(session, [edges] * IMAGES))
        without.append(run(plain_session, None))
        print(
            f"round {r}: control {with_control[-1]:.3f} s/img  plain {without[-1]:.3f} s/img",
            flush=True,
        )
    ratio = forward_ratio(session, size)
    time_ratio = statistics.median(with_control) / statistics.median(without)
    print(
        f"UNet evaluations per image {per_image_unet:g}, ControlNet evaluations per image "
        f"{per_image_net:g} ({len(unet_rows)} UNet calls for {IMAGES} images)"
    )
    print(f"one ControlNet forward / one UNet forward: {ratio:.3f}")
    print(
        f"forward-equivalents per image: {per_image_unet + per_image_net * ratio:.2f} "
        f"(vs {per_image_unet} without)"
    )
    print(
        f"time per image with / without control: {time_ratio:.3f} "
        f"(expected about 1 + {ratio:.2f} when the UNet dominates)"
    )


if __name__ == "__main__":
    main()
