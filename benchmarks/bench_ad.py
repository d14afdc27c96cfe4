"""Benchmark AD-guided stylization: stylekit's few-step AD vs the reference 50-step AD sampler.

The reference sampler follows the attention-distillation release's guided sampling (spec:
docs/attention-distillation.md): DDIM 50 steps, CFG 7.5, after each step AdaIN to the
reference noised to the next timestep, its features recorded, then 3 Adam iterations (lr 0.015).
stylekit runs the same guidance after each of 4 few-step (LCM) steps, with the reference features
computed once per run. Both use stylekit's attention recording and losses, so only the schedule
differs. UNet calls are counted with hooks (machine-independent), wall time side by side.

    python benchmarks/bench_ad.py           # full-size random SD1.5, 256 px, bf16 (~10 min on 2 cores)
    python benchmarks/bench_ad.py --tiny    # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stylekit.engine import ad
from stylekit.engine.conditioning import encode_text
from stylekit.engine.predict import noise_predictor
from stylekit.presets import Settings
from stylekit.session import Runtime, Session, open_session
from stylekit.testing import build_sd15

CACHE = Path(__file__).parent / ".cache"


@dataclass
class Counter:
    forward: int = 0
    backward: int = 0

    @property
    def equivalents(self) -> int:
        """UNet forward-equivalents: a backward costs about two forwards."""
        return self.forward + 2 * self.backward


def count_calls(unet) -> Counter:
    """Count UNet forward rows (a CFG call is two) and backward rows (one per Adam step's latent)."""
    counter = Counter()

    def counted_forward(module, args):
        counter.forward += args[0].shape[0]

    unet.register_forward_pre_hook(counted_forward)
    step = torch.optim.Adam.step

    def counted_step(self, *args, **kwargs):
        counter.backward += sum(p.shape[0] for g in self.param_groups for p in g["params"])
        return step(self, *args, **kwargs)

    torch.optim.Adam.step = counted_step
    return counter


def image(seed: int, size: int) -> Image.Image:
    photos = sorted((Path(__file__).parent.parent / "examples").glob("*/*.jpg"))
    if seed < len(photos):
        return Image.open(photos[seed]).convert("RGB").resize((size, size))
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))


def settings(model: Path) -> Settings:
    return Settings(
        model=str(model),
        accelerator="none",
        scheduler="lcm",
        steps=4,
        strength=0.75,
        cfg=1.0,
        style_mode="ad",
        ad_iters=3,
        ad_lr=0.015,
        ad_adain=True,
    )


def reference_sampler(stylizer: Session, size: int, seed: int, *, steps=50, cfg=7.5, iters=3):
    """The AD release's guided sampling: DDIM `steps`, CFG, then AdaIN + AD refinement each step."""
    from diffusers import DDIMScheduler

    model, refs, ac = stylizer.model, stylizer.references, stylizer.sampler.ac
    ddim = DDIMScheduler.from_config(model.pipe.scheduler.config)
    ddim.set_timesteps(steps)
    cond = encode_text(model, "", "", cfg=cfg)
    eps = noise_predictor(model, cond, size, size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(model.dtype)
    ts = [int(t) for t in ddim.timesteps]
    with torch.no_grad():
        for i, t in enumerate(ts):
            x = ddim.step(eps(x, t), t, x).prev_sample
            t_next = ts[i + 1] if i + 1 < len(ts) else 0
            x = ad.adain_to(refs, x, t_next, ac)
            goals = [
                ad.reference_features(
                    model.unet,
                    ad.noised(refs, i, t_next, ac),
                    t_next,
                    ad.unet_inputs(model, refs, z),
                    refs.layers,
                )
                for i, z in enumerate(refs.latents)
            ]  # recomputed every step, as the reference implementation does
            x = ad.refine(
                model.unet,
                x,
                t_next,
                ad.unet_inputs(model, refs, x),
                goals,
                layers=refs.layers,
                iters=iters,
                lr=0.015,
            ).x
    return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--images", type=int, default=2, help="stylekit images (features reused)")
    args = parser.parse_args(argv)
    name = "sd15-tiny" if args.tiny else "sd15-full"
    model = CACHE / name
    if not (model / "model_index.json").exists():
        build_sd15(model, size="tiny" if args.tiny else "full", dtype=torch.bfloat16)
    size = 64 if args.tiny else 256
    runtime = Runtime(device="cpu", dtype="bf16")
    stylizer = open_session(settings(model), runtime, style=[image(0, size)], seed=0)
    counter = count_calls(stylizer.model.unet)
    stylizer.img2img([image(1, size)], [0])  # warm-up (also fills the reference-feature cache)
    stylizer.features.noised.clear()
    counter.forward = counter.backward = 0
    start = time.perf_counter()
    for i in range(args.images):
        stylizer.img2img([image(1 + i, size)], [i])
    sk_time = (time.perf_counter() - start) / args.images
    sk_calls = counter.equivalents / args.images
    print(
        f"stylekit AD, 4 NFE: {sk_time:.1f} s/image, {sk_calls:.1f} UNet forward-equivalents/image "
        f"({counter.forward} forwards, {counter.backward} backwards over {args.images} images)",
        flush=True,
    )
    counter.forward = counter.backward = 0
    start = time.perf_counter()
    reference_sampler(stylizer, size, seed=0)
    ref_time = time.perf_counter() - start
    print(
        f"reference AD, DDIM 50 x 3 iters: {ref_time:.1f} s/image, {counter.equivalents} "
        f"forward-equivalents ({counter.forward} forwards, {counter.backward} backwards)"
    )
    print(
        f"speed-up: {ref_time / sk_time:.1f}x wall, {counter.equivalents / sk_calls:.1f}x UNet work "
        "(goal >= 10x)"
    )


if __name__ == "__main__":
    sys.exit(main())
