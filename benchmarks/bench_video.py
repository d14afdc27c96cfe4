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

`--motion` adds motion-module mode (`MotionStream`, `stylekit video --motion-adapter`): the same
model turned into a motion UNet by a random MotionAdapter of AnimateDiff's SD1.5 layout
(`stylekit.testing.build_motion_adapter(size="full")`), frames denoised jointly in windows of
`--context-frames` overlapping by `--context-overlap`. `--call-memory` measures the memory one
UNet call takes (peak resident memory over the call, Linux `VmHWM` reset through `clear_refs`): one window of frames
through the motion UNet vs one frame through the 2-D UNet, each in a fresh process
(`--call-memory`, Linux only).

    python benchmarks/bench_video.py --motion --clips moving --frames 40
    python benchmarks/bench_video.py --call-memory
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
    unet_rows_per_frame: float = 0.0  # frame rows through the UNet per output frame


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


def stylizer(model: Path, vae: Path, args, adapter: Path | None = None):
    """The benchmark's session: LCM, no CFG, no style; with `adapter`, a motion UNet for video."""
    from stylekit.session import Runtime, open_session, resolve_settings

    settings = resolve_settings(
        None,
        None,
        dict(
            model=str(model),
            motion_adapter=str(adapter) if adapter is not None else None,
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
    runtime = Runtime(device=args.device, dtype=args.dtype)
    return open_session(settings, runtime, task="video" if adapter is not None else "img2img")


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


def motion_adapter(root: Path, tiny: bool) -> Path:
    """A random MotionAdapter for the SD1.5 UNet (AnimateDiff v1-5-2's layout at full size)."""
    from stylekit.testing import build_motion_adapter

    path = root / ("motion-tiny" if tiny else "motion-full")
    if not (path / "config.json").exists():
        print(f"building the random MotionAdapter in {path} …", file=sys.stderr)
        size = "tiny" if tiny else "full"
        build_motion_adapter(path, size=size, dtype=torch.bfloat16)
    return path


def run_motion(s, frames, *, args):
    from stylekit.engine.motion import MotionOptions, MotionStream
    from stylekit.engine.stream import StreamOptions

    options = StreamOptions(steps=args.steps, strength=args.strength, seed=args.seed)
    motion = MotionOptions(args.context_frames, args.context_overlap)
    stream = MotionStream(s.model, s.cond, s.sampler, options, motion)
    return [out.copy() for out in stream.run(frames)], stream


def peak_rss_during(fn) -> int:
    """Bytes of resident memory `fn` added at its peak (Linux: VmHWM after resetting it)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS

    def field(name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {name} in /proc/self/status")

    before = field("VmRSS:")
    fn()
    return field("VmHWM:") - before


@torch.no_grad()
def measure_call(which: str, adapter: Path, size: int, frames: int, tiny: bool = False) -> int:
    """In this (fresh) process: the memory one UNet call adds at its peak, the 2-D UNet on one
    frame (`flat`) or the motion UNet on a window of `frames` (`motion`); random weights, bf16."""
    from diffusers import MotionAdapter, UNetMotionModel

    from stylekit.testing import random_unet

    unet = random_unet("sd15", size="tiny" if tiny else "full")
    width = unet.config.cross_attention_dim
    h, text = size // 8, torch.randn(1, 77, width, dtype=torch.bfloat16)
    if which == "flat":
        z = torch.randn(1, 4, h, h, dtype=torch.bfloat16)
        return peak_rss_during(lambda: unet(z, 500, encoder_hidden_states=text))
    unet = UNetMotionModel.from_unet2d(unet, MotionAdapter.from_pretrained(adapter))
    unet = unet.to(torch.bfloat16)
    z = torch.randn(1, 4, frames, h, h, dtype=torch.bfloat16)
    text = text.repeat_interleave(frames, 0)
    return peak_rss_during(lambda: unet(z, 500, encoder_hidden_states=text))


def call_memory(adapter: Path, size: int, frames: int, tiny: bool) -> tuple[int, int]:
    """`measure_call` for both UNets, each in a fresh process (an allocator that already holds
    freed memory would hide the peak); big allocations are mmapped so frees return to the OS."""
    import os
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    peaks = []
    for which in ("flat", "motion"):
        cmd = [sys.executable, __file__, "--measure-call", which, "--size", str(size)]
        cmd += ["--adapter", str(adapter), "--context-frames", str(frames)]
        cmd += ["--tiny"] if tiny else []
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        peaks.append(int(out.strip().splitlines()[-1]))
    return peaks[0], peaks[1]


def timed(fn, device: torch.device):
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


# --- the run -----------------------------------------------------------------------------------


def bench_clip(name, frames, pipe, s, args, motion=None) -> list[Row]:
    device = s.model.device
    rows = []
    run_naive(pipe, frames[:1], steps=args.steps, strength=args.strength, seed=args.seed)
    naive, seconds = timed(
        lambda: run_naive(pipe, frames, steps=args.steps, strength=args.strength, seed=args.seed),
        device,
    )
    base_fps = len(frames) / seconds
    calls = len(frames) * args.steps
    rows.append(row(name, "diffusers naive", frames, naive, seconds, base_fps, calls, calls))
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
        stats = stream.stats
        rows.append(
            row(
                name,
                label,
                frames,
                outs,
                seconds,
                base_fps,
                stats.unet_calls,
                stats.processed * args.steps,
            )
        )
    if motion is not None:
        run_motion(motion, frames[: args.context_frames], args=args)  # warm-up
        (outs, stream), seconds = timed(lambda: run_motion(motion, frames, args=args), device)
        stats = stream.stats
        label = f"stylekit motion ({args.context_frames}/{args.context_overlap} windows, {len(stats.windows)} windows)"
        rows.append(
            row(name, label, frames, outs, seconds, base_fps, stats.unet_calls, stats.unet_rows)
        )
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
    calls = len(frames) * args.steps
    rows = [row(name, label, frames, naive, seconds, base, calls, calls * per_step)]
    for consistency, mode in BANK_VARIANTS:
        options = StreamOptions(consistency=consistency, cfg_mode=mode, **opts)

        def go(clip, options=options):
            stream = FrameStream(s.model, cond, s.sampler, options)
            return [out.copy() for out in stream.run(clip)], stream

        go(frames[:2])  # warm-up
        (outs, stream), seconds = timed(lambda go=go: go(frames), device)
        per_frame = stream.stats.unet_rows / len(frames)
        label = f"stylekit {consistency}, cfg-mode {mode} ({per_frame:.2f} UNet rows/frame)"
        rows.append(
            row(
                name,
                label,
                frames,
                outs,
                seconds,
                base,
                stream.stats.unet_calls,
                stream.stats.unet_rows,
            )
        )
    return rows


def row(clip, method, frames, outs, seconds, base_fps, calls, unet_rows) -> Row:
    fps = len(frames) / seconds
    error = warp_error(iter(frames), iter(outs)).warp_error
    per_frame = unet_rows / len(frames)
    return Row(clip, method, len(frames), seconds, fps, fps / base_fps, calls, error, per_frame)


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
    parser.add_argument("--motion", action="store_true", help="add motion-module mode rows")
    parser.add_argument("--context-frames", type=int, default=16)
    parser.add_argument("--context-overlap", type=int, default=4)
    parser.add_argument("--model-dir", type=Path, default=CACHE, help="where models are built")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--call-memory", action="store_true", help="only the call memory")
    parser.add_argument("--measure-call", choices=("flat", "motion"), help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    frames = args.frames or (16 if args.tiny else 48)
    size = args.size or (64 if args.tiny else 256)
    if args.measure_call:  # the child of `call_memory`
        print(measure_call(args.measure_call, args.adapter, size, args.context_frames, args.tiny))
        return 0
    if args.call_memory:
        adapter = motion_adapter(args.model_dir, args.tiny)
        flat, window = call_memory(adapter, size, args.context_frames, args.tiny)
        print(
            f"peak memory of one UNet call, {size}px bf16: 2-D UNet, 1 frame "
            f"{flat / 2**20:.0f} MiB; motion UNet, a window of {args.context_frames} frames "
            f"{window / 2**20:.0f} MiB ({window / max(flat, 1):.1f}×)"
        )
        return 0

    from stylekit.engine.models import DTYPES, quiet_libraries, resolve_device

    quiet_libraries()
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    model, vae = build_models(args.model_dir, args.tiny)
    pipe = naive_pipeline(model, vae, dtype, device)
    s = stylizer(model, vae, args)
    motion = None
    if args.motion:
        motion = stylizer(model, vae, args, motion_adapter(args.model_dir, args.tiny))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.clips.split(","):
            path = Path(work) / f"{name}.mp4"
            clip = encode_clip(clip_frames(name, frames, size), path)
            if args.bank:
                rows += bench_bank(name, clip, pipe, s, args)
            else:
                rows += bench_clip(name, clip, pipe, s, args, motion)
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
    print(
        f"{'clip':<8} {'method':<58} {'fps':>8} {'speedup':>8} {'UNet':>5} {'rows/fr':>7} "
        f"{'warp err':>9}"
    )
    for r in rows:
        print(
            f"{r.clip:<8} {r.method:<58} {r.fps:>8.3f} {r.speedup:>7.2f}× {r.unet_calls:>5} "
            f"{r.unet_rows_per_frame:>7.2f} {r.warp_error:>9.4f}"
        )
    for clip, goal in GOALS.items():
        ours = [r for r in rows if r.clip == clip and r.method.startswith("stylekit (")]
        if ours:
            status = "met" if ours[0].speedup >= goal else "NOT met"
            print(f"goal {clip}: ≥ {goal}× — {ours[0].speedup:.2f}× ({status})")


if __name__ == "__main__":
    sys.exit(main())
