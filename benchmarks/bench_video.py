"""Video throughput: stylekit's frame stream vs a naive per-frame diffusers img2img loop.

    python benchmarks/bench_video.py            # full-size random SD1.5, bf16, 256 px, tiny VAE
    python benchmarks/bench_video.py --tiny     # tiny random model: checks the script in seconds
    python benchmarks/bench_video.py --bank     # feature bank and residual CFG, at CFG 1.5

Both sides run the same random-weight model (`stylekit.testing.build_sd15(size="full")`, the real
SD1.5 architecture) with a TAESD-architecture `AutoencoderTiny`, the LCM sampler, the same NFE
and strength, no CFG, on the same decoded frames, side by side in one run:

- naive: `StableDiffusionImg2ImgPipeline(prompt, image=frame, ...)` once per frame, seeded the
  same each frame (the loop most scripts write);
- stylekit: `FrameStream` with conditioning computed once, fixed noise, the similarity filter
  (`--skip-similar`, StreamDiffusion's 0.98 by default) and stream batch on its device default
  (`--compare-batch` adds a row with it toggled).

Clips, generated here and encoded with x264 like a real file: (a) `moving`: a sharp random
texture panned by size/16 px per frame, every pixel changes every frame; (b) `static`: the
same texture still for 20 frames, panning for 4, still for 20, panning for 4 (the shape of a
talking head or a screen recording). Frames per second count every output frame, VAE
encode/decode included, file decode/encode excluded, after one warm-up frame per method.
Goals: stylekit ≥ 1.3× naive on (a), ≥ 3× on (b). Also reports UNet calls and the warping error
(benchmarks/warp_error.py) of each output. Random weights measure cost, not looks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from warp_error import warp_error  # noqa: E402

CACHE = Path(__file__).parent / ".cache"  # git-ignored
PROMPT = "an oil painting of a city street"
GOALS = {"moving": 1.3, "static": 3.0}


@dataclass
class Row:
    clip: str
    method: str
    frames: int
    seconds: float
    fps: float
    speedup: float
    unet_calls: int
    warp_error: float


# --- models and clips --------------------------------------------------------------------------


def build_models(root: Path, tiny: bool) -> tuple[Path, Path]:
    """The random SD1.5 folder and a TAESD-architecture tiny VAE, built once into `root`.

    Same recipe and names as benchmarks/bench_stylize.py, so the two share the cache.
    """
    from diffusers import AutoencoderTiny

    from stylekit.testing import build_sd15

    name = "sd15-tiny" if tiny else "sd15-full"
    model, vae = root / name, root / f"{name}-taesd"
    if not (model / "model_index.json").exists():
        print(f"building the random SD1.5 in {model} …", file=sys.stderr)
        build_sd15(model, size="tiny" if tiny else "full", dtype=torch.bfloat16)
    if not (vae / "config.json").exists():
        torch.manual_seed(0)
        channels = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
        tiny_vae = AutoencoderTiny(**channels) if tiny else AutoencoderTiny()  # TAESD's defaults
        tiny_vae.to(torch.bfloat16).save_pretrained(vae)
    return model, vae


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A sharp colour texture: random noise at 1/2 and 1/8 scale, upsampled, uint8."""
    rng = np.random.default_rng(seed)
    layers = []
    for scale in (2, 8):
        small = rng.integers(0, 256, (height // scale + 1, width // scale + 1, 3), dtype=np.uint8)
        big = Image.fromarray(small).resize(
            (width + scale, height + scale), Image.Resampling.BICUBIC
        )
        layers.append(np.asarray(big, dtype=np.float32)[:height, :width])
    return np.clip(0.5 * layers[0] + 0.5 * layers[1], 0, 255).astype(np.uint8)


def clip_frames(kind: str, frames: int, size: int) -> list[np.ndarray]:
    """Frames of clip (a) `moving` or (b) `static` (still 20, pan 4, repeated)."""
    step = max(size // 16, 1)
    tex = texture(size, size + step * frames)
    pans = [tex[:, i * step : i * step + size] for i in range(frames)]
    if kind == "moving":
        return pans
    out, position = [], 0
    while len(out) < frames:
        for _ in range(20):
            out.append(pans[position])
        for _ in range(4):
            position += 1
            out.append(pans[position])
    return [np.ascontiguousarray(f) for f in out[:frames]]


def encode_clip(frames: list[np.ndarray], path: Path) -> list[np.ndarray]:
    """Write the clip with x264 (as a user's file would be) and return its decoded frames."""
    from stylekit.media.video import VideoWriter, read_frames

    with VideoWriter(path, fps=24) as writer:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame))
    return list(read_frames(path))


# --- the two methods ---------------------------------------------------------------------------


def naive_pipeline(model: Path, vae: Path, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        model, dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.vae = AutoencoderTiny.from_pretrained(vae, dtype=dtype)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_naive(
    pipe, frames, *, steps: int, strength: float, seed: int, guidance: float = 1.0
) -> list[np.ndarray]:
    from stylekit.engine.sampling import img2img_schedule

    n, _ = img2img_schedule(steps, strength)  # the grid length whose strength tail runs `steps`
    outs = []
    for frame in frames:
        image = pipe(
            PROMPT,
            image=Image.fromarray(frame),
            strength=strength,
            num_inference_steps=n,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images[0]
        outs.append((image * 255).round().astype(np.uint8))
    return outs


def stylizer(model: Path, vae: Path, args):
    from stylekit.session import Runtime, open_session, resolve_settings

    settings = resolve_settings(
        None,
        None,
        dict(
            model=str(model),
            tiny_vae=True,
            tiny_vae_model=str(vae),
            accelerator="none",
            scheduler="lcm",
            steps=args.steps,
            strength=args.strength,
            cfg=1.0,
            prompt=PROMPT,
            style_mode="none",
        ),
    )
    return open_session(settings, Runtime(device=args.device, dtype=args.dtype))


def run_stylekit(s, frames, *, args, stream_batch: bool | None):
    from stylekit.engine.stream import FrameStream, StreamOptions

    options = StreamOptions(
        steps=args.steps,
        strength=args.strength,
        skip_similar=args.skip_similar,
        stream_batch=stream_batch,
        seed=args.seed,
    )
    stream = FrameStream(s.model, s.cond, s.sampler, options)
    return [out.copy() for out in stream.run(frames)], stream


def timed(fn, device: torch.device):
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


# --- the run -----------------------------------------------------------------------------------


def bench_clip(name, frames, pipe, s, args) -> list[Row]:
    device = s.model.device
    rows = []
    run_naive(pipe, frames[:1], steps=args.steps, strength=args.strength, seed=args.seed)
    naive, seconds = timed(
        lambda: run_naive(pipe, frames, steps=args.steps, strength=args.strength, seed=args.seed),
        device,
    )
    base_fps = len(frames) / seconds
    rows.append(
        row(name, "diffusers naive", frames, naive, seconds, base_fps, len(frames) * args.steps)
    )
    batch_default = device.type == "cuda"
    variants = [(None, "stylekit")]
    if args.compare_batch:
        variants.append(
            (not batch_default, f"stylekit, stream batch {'off' if batch_default else 'on'}")
        )
    for stream_batch, label in variants:
        run_stylekit(s, frames[:2], args=args, stream_batch=stream_batch)  # warm-up
        (outs, stream), seconds = timed(
            lambda sb=stream_batch: run_stylekit(s, frames, args=args, stream_batch=sb), device
        )
        label += f" ({'stream batch' if stream.batched else 'sequential'}, {stream.stats.skipped} skipped)"
        rows.append(row(name, label, frames, outs, seconds, base_fps, stream.stats.unet_calls))
    return rows


# --- bank mode and residual CFG -----------------------------------------------------------------

BANK_VARIANTS = (("noise", "full"), ("bank", "full"), ("bank", "self"), ("bank", "initialize"))


def bench_bank(name, frames, pipe, s, args) -> list[Row]:
    """`--bank`: the feature bank and residual CFG vs the naive loop, all at CFG `--bank-cfg`.

    Each stylekit row runs stream batch; its label gives UNet rows per output frame (the naive
    loop runs 2 rows per step under CFG: steps × 2).
    """
    from stylekit.engine.conditioning import encode_text
    from stylekit.engine.stream import FrameStream, StreamOptions

    device, g = s.model.device, args.bank_cfg
    cond = encode_text(s.model, PROMPT, None, cfg=g)
    opts = dict(steps=args.steps, strength=args.strength, seed=args.seed)
    naive_args = dict(steps=args.steps, strength=args.strength, seed=args.seed, guidance=g)
    run_naive(pipe, frames[:1], **naive_args)  # warm-up
    naive, seconds = timed(lambda: run_naive(pipe, frames, **naive_args), device)
    base = len(frames) / seconds
    per_step = 2 if cond.do_cfg else 1
    label = f"diffusers naive, CFG {g} ({args.steps * per_step} UNet rows/frame)"
    rows = [row(name, label, frames, naive, seconds, base, len(frames) * args.steps)]
    for consistency, mode in BANK_VARIANTS:
        options = StreamOptions(consistency=consistency, cfg_mode=mode, **opts)

        def go(clip, options=options):
            stream = FrameStream(s.model, cond, s.sampler, options)
            return [out.copy() for out in stream.run(clip)], stream

        go(frames[:2])  # warm-up
        (outs, stream), seconds = timed(lambda go=go: go(frames), device)
        per_frame = stream.stats.unet_rows / len(frames)
        label = f"stylekit {consistency}, cfg-mode {mode} ({per_frame:.2f} UNet rows/frame)"
        rows.append(row(name, label, frames, outs, seconds, base, stream.stats.unet_calls))
    return rows


def row(clip, method, frames, outs, seconds, base_fps, calls) -> Row:
    fps = len(frames) / seconds
    error = warp_error(iter(frames), iter(outs)).warp_error
    return Row(clip, method, len(frames), seconds, fps, fps / base_fps, calls, error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model, 64 px, 16 frames")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default 48)")
    parser.add_argument("--size", type=int, default=None, help="frame size in px (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="NFE per frame")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--skip-similar", type=float, default=0.98)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bf16", help="fp32, fp16 or bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", default="moving,static", help="which clips, comma-separated")
    parser.add_argument(
        "--compare-batch", action="store_true", help="add a row with stream batch toggled"
    )
    parser.add_argument(
        "--bank", action="store_true", help="bank mode and residual CFG rows (`bench_bank`)"
    )
    parser.add_argument("--bank-cfg", type=float, default=1.5, help="CFG scale of --bank rows")
    parser.add_argument("--model-dir", type=Path, default=CACHE, help="where models are built")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    frames = args.frames or (16 if args.tiny else 48)
    size = args.size or (64 if args.tiny else 256)

    from stylekit.engine.models import DTYPES, quiet_libraries, resolve_device

    quiet_libraries()
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    model, vae = build_models(args.model_dir, args.tiny)
    pipe = naive_pipeline(model, vae, dtype, device)
    s = stylizer(model, vae, args)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.clips.split(","):
            path = Path(work) / f"{name}.mp4"
            clip = encode_clip(clip_frames(name, frames, size), path)
            bench = bench_bank if args.bank else bench_clip
            rows += bench(name, clip, pipe, s, args)
    report(rows, args, device, size)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def report(rows: list[Row], args, device, size: int) -> None:
    kind = "tiny" if args.tiny else "full-size"
    print(
        f"{kind} random SD1.5, {args.dtype}, {size}px, LCM {args.steps} NFE at strength "
        f"{args.strength}, tiny VAE, {device} ({torch.get_num_threads()} threads)"
    )
    print(f"{'clip':<8} {'method':<64} {'fps':>8} {'speedup':>8} {'UNet':>5} {'warp err':>9}")
    for r in rows:
        print(
            f"{r.clip:<8} {r.method:<64} {r.fps:>8.3f} {r.speedup:>7.2f}× {r.unet_calls:>5} "
            f"{r.warp_error:>9.4f}"
        )
    for clip, goal in GOALS.items():
        ours = [r for r in rows if r.clip == clip and r.method.startswith("stylekit (")]
        if ours:
            status = "met" if ours[0].speedup >= goal else "NOT met"
            print(f"goal {clip}: ≥ {goal}× — {ours[0].speedup:.2f}× ({status})")


if __name__ == "__main__":
    sys.exit(main())
