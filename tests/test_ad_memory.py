"""AD's memory plan: checkpointing and micro-batches chosen from free device memory, as a table;
and a plan changes how the refinement runs, not what it computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stylekit.engine import ad, memory
from stylekit.engine.ad import MemoryPlan, ad_memory_estimate, memory_plan
from stylekit.presets import Settings
from stylekit.session import Runtime, open_session

GIB = 2**30
SDXL_1024 = 128 * 128  # latent tokens of a 1024² image
SD15_512 = 64 * 64


def test_estimate_grows_with_pixels_rows_and_dtype_and_checkpointing_saves():
    one = ad_memory_estimate("sdxl", SDXL_1024, rows=1, checkpointing=False)
    assert ad_memory_estimate("sdxl", SDXL_1024, rows=2, checkpointing=False) == 2 * one
    assert ad_memory_estimate("sdxl", SDXL_1024, rows=1, checkpointing=False, dtype_bytes=4) == (
        2 * one
    )
    assert ad_memory_estimate("sdxl", SDXL_1024 // 4, rows=1, checkpointing=False) < one
    assert ad_memory_estimate("sdxl", SDXL_1024, rows=1, checkpointing=True) < one
    assert ad_memory_estimate("sd15", SDXL_1024, rows=1, checkpointing=False) < one
    # a family without measurements gets SDXL's figures; SD 2.x SD1.5's (the same layout)
    assert ad_memory_estimate("sd3", SDXL_1024, rows=1, checkpointing=False) == one
    assert ad_memory_estimate("sd2", SD15_512, rows=1, checkpointing=True) == (
        ad_memory_estimate("sd15", SD15_512, rows=1, checkpointing=True)
    )


# (free GiB, family, latent tokens, rows, forced checkpointing) -> (checkpointing, micro-batch).
# Devices as users have them, with the default SDXL preset at 1024² and SD1.5 at 512²; free memory
# is what is left beside the fp16 weights (SDXL ~7 GiB with its text encoders, SD1.5 ~2 GiB). With
# the measured figures one SDXL 1024² image is estimated at 6.5 GiB without checkpointing, 1.9 with.
TABLE = [
    (None, "sdxl", SDXL_1024, 2, None, (False, 2)),  # unknown (MPS): as configured
    (130.0, "sdxl", SDXL_1024, 2, None, (False, 2)),  # H200
    (70.0, "sdxl", SDXL_1024, 4, None, (False, 4)),  # A100-80GB, 4 texture windows
    (16.0, "sdxl", SDXL_1024, 2, None, (False, 1)),  # RTX 4090: one image at a time
    (16.0, "sdxl", SDXL_1024, 4, None, (False, 1)),  # 4 texture windows of 128² latents
    (8.0, "sdxl", SDXL_1024, 2, None, (True, 2)),  # a 16 GB card: checkpointing
    (3.0, "sdxl", SDXL_1024, 2, None, (True, 1)),  # a 12 GB card: both
    (0.5, "sdxl", SDXL_1024, 2, None, (True, 1)),  # nothing fits: the leanest plan
    (0.5, "sdxl", SDXL_1024, 2, False, (False, 1)),  # --no-ad-checkpointing: never on
    (130.0, "sdxl", SDXL_1024, 2, True, (True, 2)),  # --ad-checkpointing: always on
    (20.0, "sd15", SD15_512, 4, None, (False, 4)),  # SD1.5 on a 24 GB card
    (2.0, "sd15", SD15_512, 4, None, (False, 1)),  # SD1.5 on a 4 GB card
]


@pytest.mark.parametrize(("free", "family", "tokens", "rows", "forced", "want"), TABLE)
def test_memory_plan_table(free, family, tokens, rows, forced, want):
    free_bytes = None if free is None else int(free * GIB)
    plan = memory_plan(free_bytes, family, tokens, rows, checkpointing=forced)
    assert (plan.checkpointing, plan.micro_batch) == want
    assert plan.estimate == ad_memory_estimate(
        family, tokens, rows=plan.micro_batch, checkpointing=plan.checkpointing
    )
    fits = free is None or plan.estimate <= free * GIB * ad.MEMORY_HEADROOM
    assert fits or plan == MemoryPlan(forced is not False, 1, plan.estimate)  # or the leanest


# --- the plan in a run ---------------------------------------------------------------------------


def noise_image(seed, size=64):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def session(sd15_path):
    settings = Settings(
        model=str(sd15_path),
        accelerator="none",
        scheduler="tcd",
        steps=2,
        strength=0.75,
        cfg=1.0,
        style_mode="ad",
        ad_iters=2,
        ad_lr=0.05,
        ad_adain=False,
    )
    return open_session(settings, Runtime("cpu", "fp32"), style=[noise_image(1)], seed=5)


def refine_batch(session, plan: MemoryPlan | None, z: torch.Tensor) -> tuple[torch.Tensor, list]:
    """refine_at on z with `plan` forced (None: decided); the refinement forwards it ran, as
    (batch, checkpointing) (the reference pass runs without grad and is left out)."""
    cache = ad.FeatureCache()
    if plan is not None:
        cache.plans[tuple(z.shape)] = plan
    seen = []
    unet = session.model.unet

    def hook(module, args):
        if torch.is_grad_enabled():
            seen.append((args[0].shape[0], unet.is_gradient_checkpointing))

    handle = unet.register_forward_pre_hook(hook)
    try:
        out = ad.refine_at(session.model, session.references, cache, z, 500, session.sampler.ac)
    finally:
        handle.remove()
    return out, seen


def test_micro_batch_and_checkpointing_change_how_not_what(session):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole, calls = refine_batch(session, MemoryPlan(False, 3, 0), z)
    assert calls == [(3, False)] * 2  # ad_iters 2, all rows at once
    for plan in (MemoryPlan(False, 1, 0), MemoryPlan(True, 1, 0), MemoryPlan(True, 2, 0)):
        out, calls = refine_batch(session, plan, z)
        rows = [3] if plan.micro_batch == 3 else [plan.micro_batch, 3 - plan.micro_batch]
        rows = [1, 1, 1] if plan.micro_batch == 1 else rows
        assert calls == [(b, plan.checkpointing) for b in rows for _ in range(2)]
        # each row's gradient is its own (the loss scaled by the rows), so the result does not
        # depend on the rows refined together; batched matmuls round differently: fp32 noise
        assert torch.allclose(out, whole, atol=1e-5, rtol=1e-4), (plan, (out - whole).abs().max())
    assert not session.model.unet.is_gradient_checkpointing  # restored


def test_little_free_memory_turns_checkpointing_on_one_row_at_a_time(session, monkeypatch):
    monkeypatch.setattr(memory, "available", lambda device: 1)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    _, calls = refine_batch(session, None, z)
    assert calls == [(1, True)] * 4  # 2 rows, one at a time, 2 iterations each
    monkeypatch.setattr(memory, "available", lambda device: 10**15)
    _, calls = refine_batch(session, None, z)
    assert calls == [(2, False)] * 2
