"""Throughput and peak memory on a GPU: stylekit against plain diffusers pipelines, same run.

    python benchmarks/bench_gpu.py --json /tmp/bench_gpu.json      # CUDA, full-size, fp16 (< 8 min)
    python benchmarks/bench_gpu.py --device cpu --tiny             # tiny models: checks the script

Models: the full-size SD1.5 and SDXL base architectures with random weights
(`stylekit.testing.build_sd15` / `build_sdxl` with `size="full"`, written once under `--models`,
nothing downloaded); `--tiny` builds the test suite's tiny models instead. Random weights measure
cost, not looks. No accelerator LoRA is fused (fusing costs nothing per image).

Cases (stylekit side / plain diffusers side):

- `sd15-lcm-4`: SD1.5, LCM, 4 NFE at strength 0.5, no CFG, 512², full VAE: `Session.img2img` in
  its default batch / `StableDiffusionImg2ImgPipeline` + `LCMScheduler`, one image per call.
- `turbo-shape-1`: SD-Turbo's recipe (1 NFE at strength 0.5, no CFG, 512²) on the SD1.5 UNet
  (SD-Turbo's is SD2.1's: 865 M parameters against 860 M, the same cost class).
- `sdxl-tcd-8`: SDXL, TCD γ 0, 8 NFE at strength 0.75, CFG 6, 1024² (STD's recipe without the
  LoRA) / `StableDiffusionXLImg2ImgPipeline` + `TCDScheduler`.
- `sdxl-ad`: the same with AD guidance (style mode ad: AdaIN + 3 Adam iterations after each step,
  one 1024² reference) / diffusers has no AD: the plain SDXL run of `sdxl-tcd-8` is the baseline,
  so the ratio is AD's cost.
- `video-sd15`: `FrameStream` (fixed noise, stream batch on its device default) on a panned
  texture, SD1.5 LCM 4 NFE at strength 0.5, 512² / the pipeline once per frame.

Each side gets one warm-up call, then runs until `--images` images (frames) or `--seconds`
seconds, whichever comes first; rate = images / wall time (VAE and PIL conversion included).
Peak memory is `torch.cuda.max_memory_allocated` over the side's timed run (weights included);
"n/a" on a CPU. The two sides of a family never share the GPU: diffusers' pipeline is freed before
stylekit loads.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CACHE = Path(__file__).parent / ".cache"  # git-ignored
PROMPT = "an oil painting of a city street"
CASES = ("sd15-lcm-4", "turbo-shape-1", "sdxl-tcd-8", "sdxl-ad", "video-sd15")
PUBLISHED = {  # StreamDiffusion's README, RTX 4090, TensorRT + tiny VAE, img2img fps
    "sd15-lcm-4": "StreamDiffusion LCM-LoRA 4 steps: 37.1 fps",
    "turbo-shape-1": "StreamDiffusion SD-Turbo 1 step: 93.9 fps",
}


@dataclass(frozen=True)
class Case:
    """One workload: family, sampler, NFE, strength, CFG, size, AD or video."""

    name: str
    family: str
    scheduler: str
    steps: int
    strength: float
    cfg: float
    ad: bool = False
    video: bool = False


def cases() -> list[Case]:
    return [
        Case("sd15-lcm-4", "sd15", "lcm", 4, 0.5, 1.0),
        Case("turbo-shape-1", "sd15", "lcm", 1, 0.5, 1.0),
        Case("sdxl-tcd-8", "sdxl", "tcd", 8, 0.75, 6.0),
        Case("sdxl-ad", "sdxl", "tcd", 8, 0.75, 6.0, ad=True),
        Case("video-sd15", "sd15", "lcm", 4, 0.5, 1.0, video=True),
    ]


@dataclass
class Row:
    case: str
    side: str
    images: int
    seconds: float
    per_second: float
    peak_gib: float | None
    ratio: float | None = None  # stylekit's rate / diffusers' rate
    note: str = ""


# --- models and inputs -------------------------------------------------------------------------


def build_models(root: Path, tiny: bool, dtype: torch.dtype) -> dict[str, Path]:
    """The random SD1.5 and SDXL folders, built once into `root`."""
    from stylekit.testing import build_sd15, build_sdxl

    size = "tiny" if tiny else "full"
    tag = str(dtype).removeprefix("torch.")
    paths = {}
    for family, build in (("sd15", build_sd15), ("sdxl", build_sdxl)):
        path = root / f"gpu-{family}-{size}-{tag}"
        if not (path / "model_index.json").exists():
            print(f"building the random {family} ({size}) in {path} …", file=sys.stderr, flush=True)
            build(path, size=size, dtype=dtype)
        paths[family] = path
    return paths


def texture(side: int, width: int | None = None, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    width = width or side
    small = rng.integers(0, 256, (side // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((width + 8, side + 8), Image.Resampling.BICUBIC)
    return np.asarray(big)[:side, :width].copy()


def size_of(case: Case, tiny: bool) -> int:
    if tiny:
        return 64
    return 1024 if case.family == "sdxl" else 512


# --- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], int], device: torch.device, images: int, seconds: float) -> Row:
    """Warm up once, then call `step` (it returns the images it made) until the budget is spent."""
    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done, start = 0, time.perf_counter()
    while done < images and (done == 0 or time.perf_counter() - start < seconds):
        done += step()
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Row("", "", done, elapsed, done / elapsed, peak)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- diffusers -----------------------------------------------------------------------------------


def diffusers_pipeline(path: Path, family: str, scheduler: str, dtype, device):
    """The plain diffusers img2img pipeline of the family, with the case's scheduler."""
    from diffusers import (
        LCMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
        TCDScheduler,
    )

    if family == "sdxl":
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(path, dtype=dtype)
    else:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            path, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    kind = TCDScheduler if scheduler == "tcd" else LCMScheduler
    pipe.scheduler = kind.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def diffusers_step(pipe, case: Case, image: Image.Image) -> Callable[[], int]:
    from stylekit.engine.sampling import grid_steps_for

    n = grid_steps_for(case.steps, case.strength)
    extra = {"negative_prompt": ""} if case.cfg > 1 else {}

    def step() -> int:
        pipe(
            PROMPT,
            image=image,
            strength=case.strength,
            num_inference_steps=n,
            guidance_scale=case.cfg,
            generator=torch.Generator("cpu").manual_seed(0),
            **extra,
        )
        return 1

    return step


def diffusers_video(pipe, case: Case, frames: list[np.ndarray]) -> Callable[[], int]:
    """One call: the next frame of the looped clip through the pipeline (the usual script)."""
    calls = [diffusers_step(pipe, case, Image.fromarray(f)) for f in frames]
    count = 0

    def step() -> int:
        nonlocal count
        count += 1
        return calls[(count - 1) % len(calls)]()

    return step


# --- stylekit ------------------------------------------------------------------------------------


def stylekit_session(path: Path, case: Case, runtime, style: list[Image.Image]):
    from stylekit.presets import Settings
    from stylekit.session import open_session

    settings = Settings(
        model=str(path),
        accelerator="none",
        scheduler=case.scheduler,
        steps=case.steps,
        strength=case.strength,
        cfg=case.cfg,
        gamma=0.0,
        prompt=PROMPT,
        negative="" if case.cfg > 1 else None,
        style_mode="ad" if case.ad else "none",
    )
    return open_session(settings, runtime, style=style if case.ad else (), seed=0)


def stylekit_step(session, image: Image.Image, batch: int) -> Callable[[], int]:
    images, seeds = [image] * batch, list(range(batch))

    def step() -> int:
        session.img2img(images, seeds)
        return batch

    return step


def stylekit_video(session, case: Case, frames: list[np.ndarray]) -> Callable[[], int]:
    """One call: one more output frame of a stream over the looped clip."""
    from stylekit.engine.stream import FrameStream, StreamOptions

    options = StreamOptions(steps=case.steps, strength=case.strength, seed=0)
    stream = FrameStream(session.model, session.cond, session.sampler, options)

    def clip() -> Iterator[np.ndarray]:
        while True:
            yield from frames

    outputs = stream.run(clip())

    def step() -> int:
        next(outputs)
        return 1

    return step


# --- the run -------------------------------------------------------------------------------------


def run_family(family: str, path: Path, args, runtime, device, dtype) -> list[Row]:
    """Every case of one family: diffusers' side first (then freed), then stylekit's."""
    mine = [c for c in cases() if c.family == family and c.name in args.cases]
    if not mine:
        return []
    size = size_of(mine[0], args.tiny)
    image = Image.fromarray(texture(size))
    pan = texture(size, size + 4 * args.images, seed=1)
    frames = [pan[:, 4 * i : 4 * i + size].copy() for i in range(args.images)]
    rows: list[Row] = []

    def record(case: Case, side: str, row: Row, note: str = "") -> None:
        row.case, row.side, row.note = case.name, side, note
        rows.append(row)
        print(json.dumps(asdict(row)), file=sys.stderr, flush=True)

    baseline: dict[str, Row] = {}
    for scheduler in dict.fromkeys(c.scheduler for c in mine):
        pipe = diffusers_pipeline(path, family, scheduler, dtype, device)
        for case in (c for c in mine if c.scheduler == scheduler):
            if case.ad and "sdxl-tcd-8" in baseline:  # no AD in diffusers: the plain run
                record(case, "diffusers", replace(baseline["sdxl-tcd-8"]), "plain SDXL, no AD")
                continue
            step = (
                diffusers_video(pipe, case, frames)
                if case.video
                else diffusers_step(pipe, case, image)
            )
            row = timed(step, device, args.images, args.seconds)
            baseline[case.name] = row
            record(case, "diffusers", row, "no AD" if case.ad else "")
        del pipe
        release(device)
    from stylekit.session import default_batch

    batch = args.batch or (1 if args.tiny else default_batch(runtime))
    for case in mine:
        session = stylekit_session(path, case, runtime, [image])
        step = (
            stylekit_video(session, case, frames)
            if case.video
            else stylekit_step(session, image, batch)
        )
        row = timed(step, device, args.images, args.seconds)
        base = next(r for r in rows if r.case == case.name and r.side == "diffusers")
        row.ratio = row.per_second / base.per_second
        note = f"batch {batch}" if not case.video else "stream"
        record(case, "stylekit", row, note)
        del session, step
        release(device)
    return rows


def table(rows: list[Row]) -> str:
    rows = sorted(rows, key=lambda r: (CASES.index(r.case), r.side))
    head = (
        "| case | side | images | s | images/s | peak GiB | stylekit / diffusers | note |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r.case} | {r.side} | {r.images} | {r.seconds:.1f} | {r.per_second:.2f} "
        f"| {'n/a' if r.peak_gib is None else f'{r.peak_gib:.1f}'} "
        f"| {'' if r.ratio is None else f'{r.ratio:.2f}×'} | {r.note} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on cuda), fp16, bf16 or fp32")
    p.add_argument("--tiny", action="store_true", help="tiny models at 64 px: seconds, on a CPU")
    p.add_argument("--images", type=int, help="most images per side (default 12; tiny 2)")
    p.add_argument("--seconds", type=float, help="time box per side (default 15; tiny 2)")
    p.add_argument(
        "--batch", type=int, help="stylekit's images per call (default: its own; tiny 1)"
    )
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--models", type=Path, default=CACHE, help="where the models are built")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    args.images = args.images or (2 if args.tiny else 12)
    args.seconds = args.seconds or (2.0 if args.tiny else 15.0)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse(argv)
    from stylekit.engine.models import DTYPES, quiet_libraries, resolve_device, resolve_dtype
    from stylekit.session import Runtime

    quiet_libraries()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    runtime = Runtime(device=str(device), dtype={v: k for k, v in DTYPES.items()}[dtype])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    start = time.perf_counter()
    paths = build_models(args.models, args.tiny, dtype)
    rows = []
    for family in ("sd15", "sdxl"):
        rows += run_family(family, paths[family], args, runtime, device, dtype)
    kind = "tiny" if args.tiny else "full-size"
    print(f"{kind} random SD1.5 / SDXL, {runtime.dtype}, {name}, torch {torch.__version__}")
    print(table(rows))
    for case, text in PUBLISHED.items():
        if case in args.cases:
            print(f"published, for scale: {case}: {text}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s (model builds and loads included)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
