"""Peak memory of one AD refinement step on the full-size SD1.5 and SDXL UNets, with and without
gradient checkpointing, at 512², 768² and (when there is room) 1024².

    python benchmarks/bench_ad_memory.py --json /tmp/bench_ad_memory.json   # the README table
    python benchmarks/bench_ad_memory.py --families sdxl --sizes 512        # one row

One step is what guided sampling does after every sampler step, once per Adam iteration:
`engine.ad.refine` with iters=1 (one forward of the UNet recording the last 6 self-attention
layers, the AD loss against a reference's features, one backward to the latent), batch 1, no
CFG. The UNets have the real architectures with random weights (`stylekit.testing.random_unet`,
built on the meta device and filled in bf16: no fp32 copy, nothing written to disk), in bf16,
channels-last as stylekit loads them, on the CPU.

Each case runs in a fresh interpreter (`--child`) under an address-space cap (RLIMIT_AS) of
MemAvailable − 3 GiB read at its start, so a case that does not fit fails alone (recorded
"skipped: would not fit") instead of waking the OOM killer on a shared machine; 1024² runs only
when MemAvailable is above 20 GB at that moment. The child reports its resident memory after
building the UNet, the peak (VmHWM, reset through /proc/self/clear_refs) of the reference
feature pass, and the peak of the AD step; "AD step over model" is that peak minus the resident
memory just before the step: what `engine.memory.UNET_GRAD` and `UNET_GRAD_CHECKPOINTED` hold
(per latent token, rounded up), for AD's memory plan (`engine.ad.memory_plan`) and the size check.
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

GIB = 1024**3
SAFETY = 3 * GIB  # left to the other users of the machine
BIG_SIZE_NEEDS = 20 * 10**9  # MemAvailable above which 1024² is tried
WEIGHTS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}  # UNet parameters (bf16: 2 bytes each)


# --- child: one case ---------------------------------------------------------------------------


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


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def unet_inputs(unet, family: str, latent: int):
    """Random text conditioning of the UNet's shapes (SDXL adds pooled text and size ids)."""
    import torch

    g = torch.Generator().manual_seed(1)
    dtype = unet.dtype
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g, dtype=dtype)
    if family == "sd15":
        return text
    side = float(latent * 8)
    return {
        "encoder_hidden_states": text,
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, 1280, generator=g, dtype=dtype),
            "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]], dtype=dtype),
        },
    }


def child(args) -> dict:
    """Build the UNet, record a reference's features, take one AD step; report the memory."""
    import torch

    from stylekit.engine.ad import reference_features, refine
    from stylekit.testing import random_unet

    torch.set_num_threads(args.threads)
    family, size, checkpointing = args.child_family, args.child, args.child_checkpointing
    latent = size // 8
    start = time.perf_counter()
    unet = random_unet(family, size="full", dtype=torch.bfloat16).eval()
    unet.to(memory_format=torch.channels_last)  # as stylekit loads it on CPU and CUDA
    built = time.perf_counter()
    rss_model = memory_mb("VmRSS")
    cond = unet_inputs(unet, family, latent)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 4, latent, latent, generator=g, dtype=torch.bfloat16)
    x = torch.randn(1, 4, latent, latent, generator=g, dtype=torch.bfloat16)
    t = 500
    reset_peak()
    ref_feats = reference_features(unet, ref, t, cond)  # the default 6 layers
    peak_ref = memory_mb("VmHWM")
    rss_before = memory_mb("VmRSS")
    resettable = reset_peak()
    t0 = time.perf_counter()
    result = refine(unet, x, t, cond, ref_feats, iters=1, checkpointing=checkpointing)
    step_s = time.perf_counter() - t0
    peak_step = memory_mb("VmHWM")
    assert result.x.shape == x.shape
    return {
        "family": family,
        "size": size,
        "checkpointing": checkpointing,
        "status": "ok",
        "build_s": built - start,
        "step_s": step_s,
        "rss_model_mb": rss_model,
        "peak_reference_mb": peak_ref,
        "rss_before_step_mb": rss_before,
        "peak_step_mb": peak_step if resettable else None,
        "step_over_model_mb": peak_step - rss_before if resettable else None,
        "tokens": latent * latent,
    }


# --- parent: the table -------------------------------------------------------------------------


def cap_address_space(limit: int):
    """preexec_fn: cap the child's address space at `limit` bytes."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_case(family: str, size: int, checkpointing: bool, args) -> dict:
    """One case in a fresh interpreter under the address-space cap; a failure to fit is a row."""
    row = {"family": family, "size": size, "checkpointing": checkpointing}
    available = mem_available()
    limit = available - SAFETY
    row["mem_available_gb"] = round(available / 1e9, 1)
    row["cap_gb"] = round(limit / 1e9, 1)
    if limit < 2 * WEIGHTS[family] + GIB:  # not even the bf16 weights and torch itself
        return row | {"status": "skipped: would not fit"}
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", str(size)]
    cmd += ["--child-family", family] + (["--child-checkpointing"] if checkpointing else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=cap_address_space(limit),
    )
    out, err = proc.communicate()
    if proc.returncode:
        tail = err.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return row | {"status": "skipped: would not fit", "error": tail[0][:200]}
    return json.loads(out.strip().splitlines()[-1]) | row


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    head = (
        "| UNet | size | checkpointing | status | step s | RSS model MiB | peak reference pass MiB "
        "| peak AD step MiB | AD step over model MiB | bytes / latent token |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        over = r.get("step_over_model_mb") if ok else None
        per_token = over * 2**20 / r["tokens"] if over is not None else None
        lines.append(
            f"| {r['family']} | {r['size']}² | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['status']} | {fmt(r.get('step_s'), '.1f')} | {fmt(r.get('rss_model_mb'), '.0f')} "
            f"| {fmt(r.get('peak_reference_mb'), '.0f')} | {fmt(r.get('peak_step_mb'), '.0f')} "
            f"| {fmt(over, '.0f')} | {fmt(per_token, ',.0f')} |"
        )
    return "\n".join([head, *lines])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["sdxl", "sd15"], choices=["sd15", "sdxl"])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024], help="px, square")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-family", help=argparse.SUPPRESS)
    p.add_argument("--child-checkpointing", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child is not None:
        print(json.dumps(child(args)), flush=True)
        return
    rows, start = [], time.perf_counter()
    for family in args.families:
        for size in args.sizes:
            for checkpointing in (False, True):
                if size > 768 and mem_available() <= BIG_SIZE_NEEDS:
                    row = {"family": family, "size": size, "checkpointing": checkpointing}
                    gb = mem_available() / 1e9
                    rows.append(row | {"status": f"skipped: MemAvailable {gb:.1f} GB ≤ 20 GB"})
                else:
                    rows.append(run_case(family, size, checkpointing, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                if args.json:  # after every case: a long run keeps what it measured
                    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
