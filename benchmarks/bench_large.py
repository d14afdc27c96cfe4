"""Full-resolution stylisation (`stylize --tiled`): time per window and peak memory vs photo size.

    python benchmarks/bench_large.py                              # the table in benchmarks/README.md
    python benchmarks/bench_large.py --sizes 2048x2048 --stride 32

Each size runs in a fresh interpreter (`--child`) through the session's own method
(`Session.img2img_tiled`: tiled encode, MultiDiffusion over the UNet, tiled decode) on a smooth
random photo. The child reports its resident memory after loading, then the peak (VmHWM, reset
between phases) while encoding, sampling and decoding (the resets also reset what `ru_maxrss`
would report, so there is no whole-process column). Model: the SD1.5 architecture with random weights (bench_texture.py's
`benchmarks/.cache/sd15-full`) and, as there, a TAESD-architecture VAE by default (`--vae kl` for
SD1.5's KL VAE, about 9 s per tile on a 2-core CPU). Settings keep the table within minutes: 1
step at strength 1 (one UNet pass per window), AD off, stride = window (no overlap; the default
stride, half the window, gives about 4 times the windows), view batch 1. `--skip-sample`
measures the tiled VAE alone (the latent passes through unchanged), for sizes whose sampling would
take too long here: the UNet's cost is the same for every window (tests/test_tiled_img2img.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_texture import SD15, TAESD, drive, fmt, memory_mb, reset_peak  # noqa: E402


def load(args):
    """The stylize session as the task opens it, with the benchmark's settings."""
    from stylekit.presets import Settings
    from stylekit.session import Runtime, open_session

    settings = Settings(
        model=str(args.model), accelerator="none", scheduler="tcd", steps=1, strength=1.0, cfg=1.0
    )
    session = open_session(settings, Runtime("cpu", args.dtype), task="img2img")
    if args.vae == "taesd":
        from diffusers import AutoencoderTiny

        session.model.pipe.vae = AutoencoderTiny.from_pretrained(
            TAESD, torch_dtype=session.model.dtype
        )
    return session


def child(args) -> dict:
    """Stylise one photo with --tiled's engine; return what was measured."""
    import numpy as np
    import torch
    from PIL import Image

    from stylekit.engine import img2img as engine
    from stylekit.engine import windows as tiled_vae  # `Windows.encode` calls its encode_tiled
    from stylekit.tasks.stylize import Tiled

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.child.split("x"))
    start = time.perf_counter()
    session = load(args)
    loaded = time.perf_counter()
    rss_loaded = memory_mb("VmRSS")
    small = np.random.default_rng(0).integers(0, 256, (height // 64, width // 64, 3), np.uint8)
    photo = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    tiled = Tiled(window=args.window, stride=args.stride or args.window, view_batch=1)
    plan = tiled.plan(photo.size, session.native)

    phases, marks = {}, {}
    real = {"encode_tiled": tiled_vae.encode_tiled, "sample": engine.sample}

    def timed(name, fn):
        def run(*a, **k):
            reset_peak()
            t = time.perf_counter()
            out = fn(*a, **k)
            phases[name] = time.perf_counter() - t
            marks[name] = memory_mb("VmHWM")
            reset_peak()
            return out

        return run

    tiled_vae.encode_tiled = timed("encode", real["encode_tiled"])  # one tile: encoded whole
    sample = real["sample"]
    if args.skip_sample:  # the latent passes through: encode and decode measured alone
        sample = lambda eps, z, *a, **k: z  # noqa: E731
    engine.sample = timed("sample", sample)
    resettable = reset_peak()
    t0 = time.perf_counter()
    out = session.img2img_tiled(photo, 0, plan)
    total = time.perf_counter() - t0
    assert out.size == photo.size
    windows = len(plan.windows())
    decode_s = total - phases["encode"] - phases["sample"]
    return {
        "size": args.child,
        "latent": f"{plan.width}x{plan.height}",
        "windows": windows,
        "load_s": loaded - start,
        "encode_s": phases["encode"],
        "sample_s": None if args.skip_sample else phases["sample"],
        "per_window_s": None if args.skip_sample else phases["sample"] / windows,
        "decode_s": decode_s,
        "rss_loaded_mb": rss_loaded,
        "peak_encode_mb": marks["encode"] if resettable else None,
        "peak_sample_mb": marks["sample"] if resettable and not args.skip_sample else None,
        "peak_decode_mb": memory_mb("VmHWM") if resettable else None,
    }


def run_size(size: str, argv: list[str]) -> dict:
    """Run one size in a fresh interpreter and return its row."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, *argv, "--child", size]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    if proc.wait():
        raise SystemExit(f"size {size}: the child failed")
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = (
        "| photo | latent | windows | encode s | sample s | s/window | decode s | RSS loaded MiB "
        "| peak encode MiB | peak sampling MiB | peak decode MiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['size']} | {r['latent']} | {r['windows']} | {r['encode_s']:.1f} "
        f"| {fmt(r['sample_s'], '.1f')} | {fmt(r['per_window_s'], '.2f')} | {r['decode_s']:.1f} "
        f"| {r['rss_loaded_mb']:.0f} | {fmt(r['peak_encode_mb'], '.0f')} "
        f"| {fmt(r['peak_sample_mb'], '.0f')} | {fmt(r['peak_decode_mb'], '.0f')} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["2048x2048", "4096x3072"], help="WxH px")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--window", type=int, default=64, help="latents")
    p.add_argument("--stride", type=int, help="latents (default = window: no overlap)")
    p.add_argument("--vae", default="taesd", choices=["taesd", "kl"])
    p.add_argument(
        "--skip-sample",
        action="store_true",
        help="encode and decode only (sampling's cost is per window, see the table's first row)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", type=Path, default=SD15, help="default: the random full-size SD1.5")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    drive(parse(argv), argv, child=child, run_size=run_size, table=table)


if __name__ == "__main__":
    main()
