"""Benchmark `stylekit stylize` against a plain diffusers img2img loop on a full-size SD1.5.

The model has SD1.5's real architecture (859 M UNet parameters) with random weights: quality means
nothing, cost is real. Both sides run in one process, interleaved round by round, on the same
images, settings and thread count, so machine noise hits both alike.

    python benchmarks/bench_stylize.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_stylize.py --tiny     # smoke test on a tiny model (seconds)

(a) 8 images at 256 px, 4 NFE (LCM, strength 0.6, no CFG), bf16, full VAE: stylekit's batch vs
    `StableDiffusionImg2ImgPipeline` called per image, both writing PNGs, model load included.
(b) With a tiny VAE (TAESD architecture): stylekit's time per image divided by NFE × one forward of
    the plain diffusers UNet (default memory format, batch 1), measured interleaved; median of rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stylekit import api
from stylekit.presets import Settings
from stylekit.runner import Output
from stylekit.testing import build_sd15

CACHE = Path(__file__).parent / ".cache"
NFE, STRENGTH, SIZE, IMAGES = 4, 0.6, 256, 8


def full_models(tiny: bool) -> tuple[Path, Path]:
    """Build (once) the random-weight SD1.5 and a TAESD-architecture tiny VAE."""
    from diffusers import AutoencoderTiny

    name = "sd15-tiny" if tiny else "sd15-full"
    model = CACHE / name
    if not (model / "model_index.json").exists():
        build_sd15(model, size="tiny" if tiny else "full", dtype=torch.bfloat16)
    taesd = CACHE / f"{name}-taesd"
    if not (taesd / "config.json").exists():
        torch.manual_seed(0)
        vae = (
            AutoencoderTiny()
            if not tiny
            else AutoencoderTiny(
                encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8)
            )
        )
        vae.to(torch.bfloat16).save_pretrained(taesd)
    return model, taesd


def content_images(folder: Path, size: int) -> list[Path]:
    """8 content images: the example photos and noise, cropped to size × size."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted((Path(__file__).parent.parent / "examples" / "content").glob("*.jpg"))
    paths = []
    for i in range(IMAGES):
        if i < len(photos):
            image = Image.open(photos[i]).convert("RGB").resize((size, size))
        else:
            rng = np.random.RandomState(i)
            image = Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))
        paths.append(folder / f"img{i}.png")
        image.save(paths[-1])
    return paths


def settings(model: Path, taesd: Path | None) -> Settings:
    return Settings(
        model=str(model),
        accelerator="none",
        scheduler="lcm",
        steps=NFE,
        strength=STRENGTH,
        cfg=1.0,
        prompt="an oil painting",
        style_mode="none",
        tiny_vae=taesd is not None,
        tiny_vae_model=str(taesd) if taesd else None,
    )


def run_stylekit(paths: list[Path], out: Path, model: Path, taesd: Path | None) -> float:
    """Wall time of the whole stylekit batch (model load included)."""
    start = time.perf_counter()
    report = api.stylize(
        [str(p) for p in paths],
        settings=settings(model, taesd),
        runtime=api.Runtime(device="cpu", dtype="bf16"),
        output=Output(out=out, overwrite=True, seed=0),
    )
    assert not report.failed, report.failed
    return time.perf_counter() - start


def run_diffusers(paths: list[Path], out: Path, model: Path, taesd: Path | None) -> float:
    """Wall time of the plain diffusers loop doing the same work (model load included)."""
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionImg2ImgPipeline

    from stylekit.engine.sampling import grid_steps_for

    start = time.perf_counter()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, dtype=torch.bfloat16)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if taesd:
        pipe.vae = AutoencoderTiny.from_pretrained(taesd, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        image = pipe(
            "an oil painting",
            image=Image.open(path).convert("RGB"),
            strength=STRENGTH,
            num_inference_steps=grid_steps_for(NFE, STRENGTH),
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(i),
        ).images[0]
        image.save(out / path.name)
    return time.perf_counter() - start


def unet_forward_time(model: Path, size: int, repeats: int = 3) -> float:
    """Median time of one forward of the plain diffusers UNet (default memory format, batch 1)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet", dtype=torch.bfloat16).eval()
    x = torch.randn(1, 4, size // 8, size // 8, dtype=torch.bfloat16)
    e = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    times = []
    with torch.no_grad():
        unet(x, 500, encoder_hidden_states=e)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            unet(x, 500, encoder_hidden_states=e)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model smoke test")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--part", choices=("a", "b", "ab"), default="ab", help="which measurements")
    args = parser.parse_args(argv)
    model, taesd = full_models(args.tiny)
    size = 64 if args.tiny else SIZE
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = content_images(tmp / "in", size)
        print(
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(paths)} images "
            f"{size}px, NFE {NFE}, bf16",
            flush=True,
        )
        run_stylekit(paths, tmp / "sk", model, None)  # warm-up: first-call costs, not counted
        run_diffusers(paths, tmp / "df", model, None)
        if "a" in args.part:
            part_a(paths, tmp, model, args.rounds)
        if "b" in args.part:
            part_b(paths, tmp, model, taesd, size, args.rounds)


def part_a(paths: list[Path], tmp: Path, model: Path, rounds: int) -> None:
    """(a) full VAE, side by side, interleaved round by round."""
    a_sk, a_df = [], []
    for r in range(rounds):
        a_sk.append(run_stylekit(paths, tmp / "sk", model, None))
        a_df.append(run_diffusers(paths, tmp / "df", model, None))
        print(f"(a) round {r}: stylekit {a_sk[-1]:.2f}s  diffusers {a_df[-1]:.2f}s", flush=True)
    ratio_a = statistics.median(a_sk) / statistics.median(a_df)
    print(f"(a) stylekit / diffusers (full VAE, {IMAGES} images): {ratio_a:.3f}  (goal <= 0.9)")


def part_b(paths: list[Path], tmp: Path, model: Path, taesd: Path, size: int, rounds: int) -> None:
    """(b) tiny VAE: per-image time over NFE plain UNet forwards, interleaved."""
    per_image, forward, df_per_image = [], [], []
    for r in range(rounds):
        forward.append(unet_forward_time(model, size))
        per_image.append(run_stylekit(paths, tmp / "skt", model, taesd) / IMAGES)
        df_per_image.append(run_diffusers(paths, tmp / "dft", model, taesd) / IMAGES)
        print(
            f"(b) round {r}: forward {forward[-1]:.3f}s  stylekit/img {per_image[-1]:.3f}s  "
            f"diffusers/img {df_per_image[-1]:.3f}s",
            flush=True,
        )
    f = statistics.median(forward)
    print(
        f"(b) stylekit per image / (NFE x plain forward), tiny VAE: "
        f"{statistics.median(per_image) / (NFE * f):.3f}  (goal <= 1.05)"
    )
    print(
        f"(b) diffusers per image / (NFE x plain forward), tiny VAE: "
        f"{statistics.median(df_per_image) / (NFE * f):.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
