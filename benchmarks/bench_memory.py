"""The figures behind `stylekit.engine.memory`: peak memory of one UNet call and one VAE decode.

Builds the full-size SD1.5 and SDXL UNets and the SD KL VAE on the meta device, then allocates
them uninitialised in the chosen dtype and fills them with small random values (nothing to
download, no fp32 copy of SDXL's 2.6 G parameters). For each size it runs, in this process,

- a UNet forward (no grad; batch 1, no CFG),
- a UNet forward + backward of a scalar loss (what one AD refinement iteration keeps alive),
- a VAE decode,

and reports the peak resident memory above what was resident before (VmHWM, reset through
/proc/self/clear_refs), per latent pixel (UNet) or per output pixel (VAE). glibc keeps freed
blocks for reuse, which would hide later peaks: the script re-executes itself with
MALLOC_MMAP_THRESHOLD_=65536, so every block of 64 KiB or more is mapped and unmapped alone.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_memory.py --json /tmp/bench_memory.json
    .venv/bin/python benchmarks/bench_memory.py --families sd15 --unet-sizes 32 48 --vae-sizes 256
    .venv/bin/python benchmarks/bench_memory.py --unet-sizes --grad-sizes --vae-sizes \\
        --control-sizes 64 128   # ControlNets: the UNet call alone, after one and two nets

Linux only (VmHWM). CPU, like every benchmark here; on a GPU the same script would need
torch.cuda.max_memory_allocated instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from functools import partial

import torch

SD15_UNET = {"cross_attention_dim": 768, "attention_head_dim": 8}  # diffusers' defaults = SD1.5
SDXL_UNET = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
TEXT = {"sd15": (77, 768), "sdxl": (77, 2048)}


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(cls, config: dict, dtype: torch.dtype):
    """A model allocated uninitialised in `dtype` (never in fp32 first), then filled randomly."""
    with torch.device("meta"):
        model = cls(**config)
    model = model.to(dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        for b in model.buffers():
            b.zero_()
    return model.eval()


def unet_call(unet, family: str, latent: int, dtype: torch.dtype, *, grad: bool):
    """One UNet call at latent `latent`², batch 1; with `grad`, the backward of a scalar too."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=g).to(dtype).requires_grad_(grad)
    text = torch.randn(1, *TEXT[family], generator=g).to(dtype)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, generator=g).to(dtype),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]]).to(
                dtype
            ),
        }
    with torch.set_grad_enabled(grad):
        out = unet(x, 500, encoder_hidden_states=text, return_dict=False, **extra)[0]
        if grad:
            out.float().square().mean().backward()


def controlled_call(net, unet, family: str, latent: int, dtype: torch.dtype, nets: int = 1):
    """`nets` ControlNet calls at latent `latent`², batch 1, then the UNet with their summed
    residuals: the control phase of one sampling step (`engine.controlnet.Control.residuals`)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=g).to(dtype)
    text = torch.randn(1, *TEXT[family], generator=g).to(dtype)
    image = torch.rand(1, 3, latent * 8, latent * 8, generator=g).to(dtype)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, generator=g).to(dtype),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]]).to(
                dtype
            ),
        }
    with torch.no_grad():
        down, mid = None, None
        for _ in range(nets):
            d, m = net(
                x,
                500,
                encoder_hidden_states=text,
                controlnet_cond=image,
                return_dict=False,
                **extra,
            )
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        unet(
            x,
            500,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            **extra,
        )


def measure_controlnet(family: str, sizes: list[int], dtype) -> list[dict]:
    """The UNet call alone, then after one and two ControlNet calls (a control phase), per size:
    the difference is what each control adds to the UNet phase."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    config = SD15_UNET if family == "sd15" else SDXL_UNET
    unet = build(UNet2DConditionModel, config, dtype)
    net = build(ControlNetModel, {k: v for k, v in config.items() if k != "up_block_types"}, dtype)
    params = sum(p.numel() for p in net.parameters())
    print(f"{family} ControlNet: {params / 1e9:.3f} G parameters", flush=True)
    rows = []
    for latent in sizes:
        for nets in (0, 1, 2):
            if nets:
                fn = partial(controlled_call, net, unet, family, latent, dtype, nets)
            else:
                fn = partial(unet_call, unet, family, latent, dtype, grad=False)
            mib, s = peak_of(fn)
            rows.append(
                {
                    "part": f"{family} UNet fwd + {nets} ControlNet",
                    "params": params,
                    "px": latent * 8,
                    "latent": latent,
                    "peak_mib": round(mib, 1),
                    "kib_per_latent_px": round(mib * 1024 / latent**2, 1),
                    "seconds": round(s, 2),
                }
            )
            print(rows[-1], flush=True)
    del unet, net
    gc.collect()
    return rows


def vae_decode(vae, z: torch.Tensor) -> None:
    with torch.no_grad():
        vae.decode(z, return_dict=False)


def peak_of(fn) -> tuple[float, float]:
    """(peak MiB above the resident memory before `fn`, seconds)."""
    gc.collect()
    reset_peak()
    before = memory_mb("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = memory_mb("VmHWM") - before
    gc.collect()
    return peak, seconds


def measure_unet(family: str, sizes: list[int], grad_sizes: list[int], dtype) -> list[dict]:
    from diffusers import UNet2DConditionModel

    unet = build(UNet2DConditionModel, SD15_UNET if family == "sd15" else SDXL_UNET, dtype)
    rows = []
    for grad, latents in ((False, sizes), (True, grad_sizes)):
        for latent in latents:
            if grad:
                unet.requires_grad_(False)  # AD needs the latent's gradient, not the weights'
            mib, s = peak_of(partial(unet_call, unet, family, latent, dtype, grad=grad))
            rows.append(
                {
                    "part": f"{family} UNet" + (" fwd+bwd" if grad else " fwd"),
                    "px": latent * 8,
                    "latent": latent,
                    "peak_mib": round(mib, 1),
                    "kib_per_latent_px": round(mib * 1024 / latent**2, 1),
                    "seconds": round(s, 2),
                }
            )
            print(rows[-1], flush=True)
    del unet
    gc.collect()
    return rows


def measure_vae(sizes: list[int], dtypes: list[torch.dtype]) -> list[dict]:
    from diffusers import AutoencoderKL

    rows = []
    for dtype in dtypes:
        vae = build(AutoencoderKL, VAE, dtype)
        for px in sizes:
            z = torch.randn(1, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(2))
            mib, s = peak_of(partial(vae_decode, vae, z.to(dtype)))
            rows.append(
                {
                    "part": f"VAE decode {str(dtype).removeprefix('torch.')}",
                    "px": px,
                    "peak_mib": round(mib, 1),
                    "bytes_per_px": round(mib * 2**20 / px**2),
                    "seconds": round(s, 2),
                }
            )
            print(rows[-1], flush=True)
        del vae
        gc.collect()
    return rows


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["sd15", "sdxl"])
    p.add_argument("--unet-sizes", nargs="*", type=int, default=[32, 64], help="latent sides")
    p.add_argument("--grad-sizes", nargs="*", type=int, default=[32], help="latent sides")
    p.add_argument("--vae-sizes", nargs="*", type=int, default=[256, 512], help="pixel sides")
    p.add_argument(
        "--control-sizes", nargs="*", type=int, default=[], help="latent sides, with ControlNets"
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--json", help="also write the rows here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # see the module docstring
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    args = parse(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = []
    for family in args.families:
        rows += measure_unet(family, args.unet_sizes, args.grad_sizes, dtype)
    for family in args.families if args.control_sizes else ():
        rows += measure_controlnet(family, args.control_sizes, dtype)
    rows += measure_vae(
        args.vae_sizes, [dtype, torch.float32] if dtype != torch.float32 else [dtype]
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
