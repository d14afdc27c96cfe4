"""Will a job fit? A deliberately simple estimate of a run's peak memory, checked before it starts.

A job's peak is the model's weights (with each control's ControlNet, and the depth estimator
for a depth control) plus the larger of two phases:

- the UNet phase: activations of one UNet call, linear in the latent pixels it sees at once
  (rows × (W/8)(H/8)), plus a fixed overhead; an AD refinement keeps a forward pass's
  activations alive for its backward pass, which costs far more per row (`UNET_GRAD`); each
  ControlNet runs on the same rows before the UNet and its residuals stay alive through the
  UNet's call (AD's backward too), which adds `CONTROL_FORWARD` per latent pixel per row;
- the VAE phase: a full decode (or encode) of one image, linear in its pixels; a texture decodes
  in tiles instead, so its VAE phase is one tile plus the canvas held as float arrays
  (`CANVAS_BYTES_PER_PX`, from benchmarks/README.md).

The constants are measured by `benchmarks/bench_memory.py` (full-size SD1.5 and SDXL UNets and
the KL VAE with random weights, CPU, bf16; table in benchmarks/README.md) and rounded up; they
scale with the dtype's size. Attention is assumed memory-efficient (PyTorch's SDPA, linear in the
tokens), as it is on CPU and CUDA. It is an estimate, meant to refuse the job that cannot fit by
far (a 100000² canvas, an 8192² photo at full size), not to be exact near the limit, which is
why `--no-size-check` exists; it leaves out small things (the IP-Adapter image encoder, AD's
reference features, video anchors).

Available memory: on CUDA `torch.cuda.mem_get_info` (free on the device) plus the blocks
PyTorch keeps cached for reuse; on a CPU (and MPS, which shares it) the kernel's MemAvailable,
lowered to a cgroup v2 limit when the process has one (containers); unknown (no check) elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

KIB, GIB = 2**10, 2**30
# Parameters of everything a family's pipeline loads (UNet + VAE + text encoders).
PARAMS = {"sd15": 1.07e9, "sd2": 1.29e9, "sdxl": 3.47e9}
# UNet activations per latent pixel per batch row, 16-bit: one forward call (measured SD1.5
# 13.4 KiB, SDXL 6.8 KiB); one AD refinement step, forward + backward through `engine.ad.refine`
# (benchmarks/bench_ad_memory.py at 512²-1024²: SD1.5 213-231 KiB, SDXL 397-415 KiB; a backward of
# a scalar of the output at 256²-384², bench_memory.py, gave 188 and 314 KiB); the same step with
# gradient checkpointing (SD1.5 107-124 KiB, SDXL 84-120 KiB). SD 2.x has SD1.5's layout.
UNET_FORWARD = {"sd15": 16 * KIB, "sd2": 16 * KIB, "sdxl": 8 * KIB}
UNET_GRAD = {"sd15": 232 * KIB, "sd2": 232 * KIB, "sdxl": 416 * KIB}
UNET_GRAD_CHECKPOINTED = {"sd15": 124 * KIB, "sd2": 124 * KIB, "sdxl": 121 * KIB}
UNET_OVERHEAD = 64 * 2**20  # per call, whatever the size (measured 22-55 MiB)
VAE_BYTES_PER_PX = 2048  # KL VAE decode of one image, per output pixel, 16-bit (measured 2020)
CANVAS_BYTES_PER_PX = 31  # texture canvas: blend buffers 16 + float image 12 + 8-bit image 3
FULL_WIDTHS = (320, 128)  # first block widths of every family's UNet and KL VAE
NATIVE_LATENT = {"sd15": 64, "sd2": 96, "sdxl": 128}  # UNet sample_size, before it is loaded
# A ControlNet (engine.controlnet) is a copy of its UNet's encoder and middle block plus zero
# convolutions and a small conditioning embedding. Parameters of a net with the family's full
# layout (counted by bench_memory.py --control-sizes: SD1.5 361 M, SDXL 1.25 G; SD 2.x as SD1.5);
# what one net adds to a UNet call per latent pixel per row, 16-bit: the net's own activations and
# its residuals, alive through the UNet's call (measured at 1024² against the UNet call alone:
# SD1.5 4.2 KiB, SDXL 4.5 KiB; two nets 7.4 / 7.7 KiB), rounded up to 6 KiB per net.
CONTROL_PARAMS = {"sd15": 0.362e9, "sd2": 0.362e9, "sdxl": 1.26e9}
CONTROL_FORWARD = {"sd15": 6 * KIB, "sd2": 6 * KIB, "sdxl": 6 * KIB}
# The depth control's estimator (Depth-Anything-V2-Small: 24.8 M parameters, loaded in fp32 by
# transformers' pipeline: 99 MB) and its activations at its own 518² input, rounded up.
DEPTH_BYTES = 128 * 2**20


@dataclass(frozen=True)
class ControlNet:
    """One control's ControlNet as the estimate sees it: its name for the message (the control
    type), its family's layout, and its first block width when known (None: the family's 320)."""

    name: str
    family: str
    width: int | None = None


@dataclass(frozen=True)
class Work:
    """What one job holds at once, in pixels: the UNet's input, the decode, a texture canvas."""

    size: tuple[int, int]  # (W, H) one UNet row sees: the image, frame or texture window
    rows: int = 1  # UNet batch rows of one call: images × CFG (× stream stages)
    grad_rows: int = 0  # rows refined by AD in one backward pass (0: no AD)
    decode: tuple[int, int] | None = None  # (W, H) decoded at once; None: `size`
    canvas: tuple[int, int] | None = None  # a texture canvas (decoded in tiles)


@dataclass(frozen=True)
class Estimate:
    """Bytes of the weights and of the two phases (the decode's with the canvas); `peak` is
    what must fit."""

    weights: int
    unet: int
    vae: int
    canvas: int = 0
    control: int = 0  # the ControlNets' part of the UNet phase (`unet` includes it)

    @property
    def peak(self) -> int:
        return self.weights + max(self.unet, self.vae + self.canvas)

    @property
    def largest(self) -> tuple[str, int]:
        """The part that dominates and its bytes, for the message."""
        unet = "UNet + ControlNet activations" if self.control else "UNet activations"
        parts = {
            unet: self.unet,
            "VAE decode": self.vae,
            "texture canvas": self.canvas,
            "weights": self.weights,
        }
        name = max(parts, key=parts.get)
        return name, parts[name]


def estimate(
    work: Work,
    family: str,
    *,
    dtype_bytes: int = 2,
    vae_bytes: int | None = None,
    widths: tuple[int | None, int | None] = (None, None),
    weights: bool = True,
    controls: Sequence[ControlNet] = (),
    depth: bool = False,
) -> Estimate:
    """The peak memory of `work` on a model of `family` (sd15, sd2, sdxl; others as sdxl).

    `dtype_bytes` is the model's (2 for fp16/bf16, 4 for fp32), `vae_bytes` the VAE's when it
    differs (SDXL's VAE decodes fp16 latents in fp32). `widths` are the UNet's and the VAE's
    first block widths when known: activations grow with them, weights with their square (the
    families' are 320 and 128; the tests' tiny models have 32). `weights=False` leaves the
    weights out (the model is loaded).
    """
    family = family if family in PARAMS else "sdxl"
    unet_scale, vae_scale = (
        w / full if w else 1.0 for w, full in zip(widths, FULL_WIDTHS, strict=True)
    )
    w, h = work.size
    latent = (w // 8) * (h // 8) * unet_scale * dtype_bytes / 2
    forward = UNET_FORWARD[family] * latent * work.rows
    backward = UNET_GRAD[family] * latent * work.grad_rows
    control = 0.0
    for net in controls:  # a net mirrors the UNet's encoder: its width scales it the same way
        scale = net.width / FULL_WIDTHS[0] if net.width else unet_scale
        per_px = CONTROL_FORWARD[control_family(net.family)] * (w // 8) * (h // 8) * scale
        control += per_px * dtype_bytes / 2 * max(work.rows, work.grad_rows)
    unet = UNET_OVERHEAD + max(forward, backward) + control
    dw, dh = work.decode or work.size
    vae = VAE_BYTES_PER_PX * vae_scale * dw * dh * (vae_bytes or dtype_bytes) / 2
    cw, ch = work.canvas or (0, 0)
    params = PARAMS[family] * unet_scale**2 if weights else 0  # parameters grow with width²
    net_bytes = 0.0
    for net in controls if weights else ():
        scale = net.width / FULL_WIDTHS[0] if net.width else unet_scale
        net_bytes += CONTROL_PARAMS[control_family(net.family)] * scale**2 * dtype_bytes
    extra = DEPTH_BYTES if depth else 0
    return Estimate(
        int(params * dtype_bytes + net_bytes + extra),
        int(unet),
        int(vae),
        CANVAS_BYTES_PER_PX * cw * ch,
        int(control),
    )


def control_family(family: str) -> str:
    """The family whose ControlNet figures apply (others as sdxl, as `estimate` does)."""
    return family if family in CONTROL_PARAMS else "sdxl"


def available(device: torch.device) -> int | None:
    """Bytes free for this run on `device`, or None when unknown (no check)."""
    if device.type == "cuda":  # free on the device, plus what PyTorch holds cached but unused
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type in ("cpu", "mps"):  # Apple silicon's GPU shares the system's memory
        return system_available()
    return None


def system_available() -> int | None:
    """MemAvailable from /proc/meminfo (else sysconf), capped by a cgroup v2 memory limit."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = cgroup_room()
    return free if limit is None or free is None else min(free, limit)


def cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup v2 memory limit; None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def too_big(est: Estimate, free: int | None) -> str | None:
    """Why the estimate does not fit in `free` bytes (one clause for an error line), or None."""
    if free is None or est.peak <= free:
        return None
    part, size = est.largest
    return f"needs about {human(est.peak)} ({part} {human(size)}), {human(free)} free"


def human(n: float) -> str:
    """Bytes as MiB, GiB or TiB with 3 significant digits."""
    for unit, size in (("TiB", 2**40), ("GiB", GIB)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**20:.3g} MiB"
