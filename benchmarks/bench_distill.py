"""Seconds per training step, peak memory and teacher UNet calls of `stylekit distill` (STD), with
and without the trajectory bank, on the full-size SD1.5 architecture (random weights).

Each variant runs in a fresh interpreter (its own peak RSS, `ru_maxrss`), the variants interleaved
`--rounds` times, through the library's own training loop (`stylekit.train.loop.distill`): bf16,
CPU, batch 1, 256 px, η 0.75, the adversarial loss on (a ViT-S/14-size DINOv2 with random weights).
Without the bank every step rolls the teacher out from k_η to a uniform k in [2, k_η] before its
own step (STD's Table 2 baseline). The first step of each run (warm-up) is left out of its mean.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).parent / ".cache"


def build(cache: Path, model: Path) -> tuple[Path, Path, Path]:
    """The full-size SD1.5 pipeline (bf16), a ViT-S/14 DINOv2 (random) and four 256² images."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import Dinov2Config, Dinov2Model

    from stylekit.testing import build_sd15

    dino, data = cache / "dinov2-small-random", cache / "distill-data"
    if not (model / "model_index.json").exists():
        build_sd15(model, size="full", dtype=torch.bfloat16)
    if not (dino / "config.json").exists():
        torch.manual_seed(0)
        config = Dinov2Config(hidden_size=384, num_attention_heads=6, intermediate_size=1536)
        Dinov2Model(config).save_pretrained(dino)
    if not data.exists():
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
                data / f"{i}.png"
            )
    return model, dino, data


def child(variant: str, steps: int, model: Path, dino: Path, data: Path, out: Path) -> dict:
    """Train `steps` steps of one variant; time each step from the JSON log."""
    from stylekit.train.loop import DistillConfig, distill

    log = out / f"{variant}.jsonl"
    log.unlink(missing_ok=True)
    cfg = DistillConfig(
        method="std",
        teacher=str(model),
        data=[str(data)],
        output=out / f"{variant}.safetensors",
        resolution=256,
        rank=64,
        batch_size=1,
        max_steps=steps,
        warmup=0,
        mixed_precision="bf16",
        bank_slots=4 if variant == "bank" else 0,
        bank_prob=0.7,
        feature_net=str(dino),
        log=log,
    )
    start = time.perf_counter()
    summary = distill(cfg)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    seconds = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]  # the first step warms up
    return {
        "variant": variant,
        "steps": steps,
        "seconds_per_step": sum(seconds) / len(seconds),
        "teacher_calls_per_step": summary["teacher_calls_per_step"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "total_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="training steps per variant")
    p.add_argument("--variants", default="bank,nobank")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of the variants")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--model",
        type=Path,
        default=CACHE / "sd15-full",
        help="SD1.5-full folder (built if missing)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    model, dino, data = build(CACHE, args.model)
    out = CACHE / "distill-out"
    out.mkdir(exist_ok=True)
    if args.child:
        print(json.dumps(child(args.child, args.steps, model, dino, data, out)))
        return
    results = []
    for variant in args.variants.split(",") * args.rounds:
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps)]
        cmd += ["--model", str(args.model)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
