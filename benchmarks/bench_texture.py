"""Peak memory and wall time of `texture-expand` at 1024², 2048² and 4096² on a full-size SD1.5.

    python benchmarks/bench_texture.py                      # the table in benchmarks/README.md
    python benchmarks/bench_texture.py --sizes 1024 --vae kl

Each size runs in a fresh interpreter (`--child`), so every peak is that size's own: the child
reports its resident memory after loading and the peak (VmHWM, reset through
/proc/self/clear_refs between phases) while sampling and while decoding; the parent adds the
whole child's peak from `os.wait4` (ru_maxrss). The model is the real SD1.5 architecture with
random weights (`stylekit.testing.build_sd15(size="full")`, built once under benchmarks/.cache):
random weights show cost, not quality.

The run goes through the task's own functions (`stylekit.tasks.textures`: plan, MultiDiffusion over
the UNet, tiled decoding) with settings chosen to keep the whole table within minutes on a small
CPU: 1 step, AD off, stride = window (no overlap: the fewest windows), view batch 1. Time should
then grow with the number of windows and decode tiles; memory while sampling with the latent
canvas only (4 channels at 1/8 resolution), memory while decoding with the pixel canvas
(decode_tiled blends tiles into a float canvas of the whole output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
SD15 = CACHE / "sd15-full"
TAESD = CACHE / "taesd-full"


# --- child: one size ---------------------------------------------------------------------------


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ensure_models(model: Path, vae: str) -> None:
    """Build the random full-size SD1.5 (and a TAESD-architecture decoder) once."""
    import torch

    from stylekit.testing import build_sd15

    if model == SD15 and not (SD15 / "model_index.json").exists():
        build_sd15(SD15, size="full", dtype=torch.bfloat16)
    if vae == "taesd" and not (TAESD / "config.json").exists():
        from diffusers import AutoencoderTiny

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            AutoencoderTiny().save_pretrained(TAESD)  # diffusers' defaults are TAESD's layout


def load(args):
    """The texture model as the task loads it, with the benchmark's settings."""
    from stylekit.presets import Settings
    from stylekit.session import Runtime, open_session

    settings = Settings(
        model=str(args.model),
        accelerator="none",
        scheduler="tcd",
        steps=args.steps,
        cfg=1.0,
        style_mode="ad" if args.ad_iters else "none",
        ad_iters=args.ad_iters,
        ad_lr=0.05,
    )
    tm = open_session(settings, Runtime("cpu", args.dtype))
    if args.vae == "taesd":
        from diffusers import AutoencoderTiny

        tm.model.pipe.vae = AutoencoderTiny.from_pretrained(TAESD, torch_dtype=tm.model.dtype)
    return tm


def child(args) -> dict:
    """Sample and decode one canvas; return what was measured."""
    import numpy as np
    import torch
    from PIL import Image

    from stylekit.tasks.textures import (
        decode_canvas,
        initial_noise,
        plan_canvas,
        sample_canvas,
        to_image,
    )

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tm = load(args)
    loaded = time.perf_counter()
    rss_loaded = memory_mb("VmRSS")
    plan = plan_canvas(
        (args.child, args.child),
        native=tm.native,
        window=args.window,
        stride=args.stride or args.window,
        view_batch=args.view_batch,
    )
    pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    if tm.settings.style_mode != "none":
        tm = tm.with_references([Image.fromarray(pixels)], seed=0)
    generator = torch.Generator("cpu").manual_seed(0)
    resettable = reset_peak()
    t0 = time.perf_counter()
    z = sample_canvas(tm, plan, initial_noise(tm, plan, generator), generator=generator)
    t1 = time.perf_counter()
    peak_sample = memory_mb("VmHWM")
    reset_peak()
    image = to_image(decode_canvas(tm.model, z, plan))
    t2 = time.perf_counter()
    assert image.size == (args.child, args.child)
    return {
        "size": args.child,
        "latent": plan.width,
        "windows": len(plan.windows()),
        "unet_calls": args.steps * -(-len(plan.windows()) // args.view_batch),
        "decode_tiles": plan.decode_tiles(),
        "load_s": loaded - start,
        "sample_s": t1 - t0,
        "decode_s": t2 - t1,
        "rss_loaded_mb": rss_loaded,
        "peak_sample_mb": peak_sample if resettable else None,
        "peak_decode_mb": memory_mb("VmHWM") if resettable else None,
    }


# --- parent: the table -------------------------------------------------------------------------


def run_size(size: int, argv: list[str]) -> dict:
    """Run one size in a fresh interpreter; add its whole-process peak RSS (ru_maxrss)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, *argv, "--child", str(size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"size {size}: the child failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_process_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    head = (
        "| output | latent | windows/step | UNet calls | decode tiles | sample s | decode s "
        "| RSS loaded MiB | peak sampling MiB | peak decoding MiB | process peak MiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['size']}² | {r['latent']}² | {r['windows']} | {r['unet_calls']} "
        f"| {r['decode_tiles']} | {r['sample_s']:.1f} | {r['decode_s']:.1f} "
        f"| {r['rss_loaded_mb']:.0f} | {fmt(r['peak_sample_mb'], '.0f')} "
        f"| {fmt(r['peak_decode_mb'], '.0f')} | {r['peak_process_mb']:.0f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="px, square")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--window", type=int, default=64, help="latents")
    p.add_argument("--stride", type=int, help="latents (default = window: no overlap)")
    p.add_argument("--view-batch", type=int, default=1)
    p.add_argument("--ad-iters", type=int, default=0, help="0: AD off")
    p.add_argument(
        "--vae",
        default="taesd",
        choices=["taesd", "kl"],
        help="decoder: a TAESD-architecture one (fast) or SD1.5's KL VAE (slow on CPU)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", type=Path, default=SD15, help="default: the random full-size SD1.5")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def drive(args, argv: list[str] | None, *, child, run_size, table) -> None:
    """The protocol of the per-size benchmarks: as `--child`, measure one size and print its row;
    else run every size in a fresh interpreter and print the table (and `--json`)."""
    if args.child is not None:
        print(json.dumps(child(args)), flush=True)
        return
    ensure_models(args.model, args.vae)
    passed = list(argv if argv is not None else sys.argv[1:])
    rows, start = [], time.perf_counter()
    for size in args.sizes:
        rows.append(run_size(size, passed))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\ntotal {time.perf_counter() - start:.0f} s (model loads included)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    drive(parse(argv), argv, child=child, run_size=run_size, table=table)


if __name__ == "__main__":
    main()
