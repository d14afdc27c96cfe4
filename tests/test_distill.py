"""`stylekit distill`: the STD/ADD trainer on tiny random models (grid, bank, losses, features,
overfitting, exact resume, two processes under accelerate, the LoRA in `stylize`)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.train import losses
from stylekit.train.bank import Bank, Trajectory
from stylekit.train.nets import teacher_mode

RUNNER = CliRunner()


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dino_path(models_dir):
    from stylekit.testing import build_dinov2

    return build_dinov2(models_dir / "dinov2-tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four 40×48 random images (one with a caption) and a file that is not an image."""
    root = tmp_path_factory.mktemp("train-images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "0.txt").write_text("a red cat\n")
    return root


@pytest.fixture(scope="module")
def nets(sd15_path):
    """The tiny SD1.5 UNet with a LoRA, seen as student and teacher (fp32, CPU)."""
    from stylekit.engine import models
    from stylekit.engine.sampling import alphas_cumprod
    from stylekit.train.nets import Nets, add_lora

    model = models.load(
        models.ModelSpec(str(sd15_path), accelerator="none", device="cpu", dtype="fp32")
    )
    torch.manual_seed(0)
    add_lora(model.unet, 4)
    ac = alphas_cumprod(dict(model.pipe.scheduler.config))
    return Nets(model.unet, model.unet, model, ac, contextlib.nullcontext)


def config(sd15_path, images, dino_path, out: Path, **kw):
    from stylekit.train.loop import DistillConfig

    base = dict(
        method="std",
        teacher=str(sd15_path),
        data=[str(images)],
        output=out,
        resolution=32,
        rank=4,
        lr=1e-3,
        disc_lr=1e-3,
        warmup=0,
        max_steps=4,
        feature_net=str(dino_path),
        mixed_precision="no",
        batch_size=2,
    )
    return DistillConfig(**(base | kw))


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- grid, bank, sampling ---------------------------------------------------------------------
def test_grid_is_ddim_trailing_50():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False)
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == [losses.grid_t(k) for k in range(49, -1, -1)]
    assert losses.start_index(0.75) == 38 and losses.grid_t(38) == 779
    assert losses.jump_span(0.75, 0.5) == 19 and losses.jump_span(0.75, 0.7) == 12
    assert losses.target_t(0) == -1 and losses.target_t(3) == 59


def test_bank_trajectory_equals_diffusers_ddim(nets):
    """ρ = 1, one slot: the stored states follow DDIMScheduler's guided loop; the slot frees at k 1."""
    from diffusers import DDIMScheduler

    from stylekit.train import std

    settings = std.StdSettings(eta=0.1, gamma=0.5, bank_prob=1.0, cfg=(3.0, 3.0))  # w = 2
    embeds, pooled = nets.text(["a cat"])
    x0 = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(1))
    traj = std.fresh(nets, x0, embeds[0], pooled[0], torch.Generator().manual_seed(2), settings)
    assert traj.k == 5 and traj.w == pytest.approx(2.0)

    sched = DDIMScheduler.from_config(
        nets.model.pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False
    )
    sched.set_timesteps(50)
    ts = [t for t in sched.timesteps.tolist() if t <= losses.grid_t(traj.k)]
    x = traj.x[None]
    u_embeds, _ = nets.text([""])
    bank, slot, g = Bank(1), None, torch.Generator().manual_seed(3)
    for t in ts[:4]:  # k 5 → 4 → 3 → 2 → 1
        with torch.no_grad(), teacher_mode(nets.unet):
            eu, ec = nets.unet(torch.cat([x, x]), t, torch.cat([u_embeds, embeds])).sample.chunk(2)
        x = sched.step(ec + 2.0 * (ec - eu), t, x).prev_sample
        (traj,) = std.teacher_step(nets, [traj])
        bank.put(slot, traj)
        if traj.k > 1:
            slot = bank.take(g, 1.0, set())
            assert slot == 0 and bank.slots[0].k == traj.k
            torch.testing.assert_close(bank.slots[0].x, x[0], atol=1e-5, rtol=0)
    assert traj.k == 1 and bank.occupied() == []  # the trajectory is done, its slot free


def _traj(k: int, tag: float) -> Trajectory:
    z = torch.full((4, 2, 2), tag)
    return Trajectory(k, z, z * 2, torch.full((3, 8), tag), torch.full((8,), tag), tag)


def test_bank_rho_zero_full_bank_and_conditioning():
    bank, g = Bank(2), torch.Generator().manual_seed(0)
    bank.put(None, _traj(5, 1.0))
    assert all(bank.take(g, 0.0, set()) is None for _ in range(20))  # ρ = 0 never continues
    bank.put(None, _traj(5, 2.0))
    bank.put(None, _traj(5, 3.0))  # full: a fresh trajectory is dropped
    assert [s.w for s in bank.slots] == [1.0, 2.0]
    taken = bank.take(g, 1.0, {0})
    assert taken == 1  # only occupied slots not taken this step
    assert torch.equal(bank.slots[1].embeds, torch.full((3, 8), 2.0))  # conditioning travels
    copy = Bank(2)
    copy.load_state_dict(bank.state_dict())
    assert [s.k for s in copy.slots] == [5, 5] and torch.equal(copy.slots[0].x0, bank.slots[0].x0)


# --- losses by hand ---------------------------------------------------------------------------
def test_pseudo_huber_by_hand():
    a = torch.zeros(2, 2)
    assert losses.pseudo_huber(a, a).item() == 0.0
    far = torch.tensor([[10.0, -10.0], [10.0, -10.0]])
    assert losses.pseudo_huber(far, a).item() == pytest.approx(10.0 - 0.001, abs=1e-6)
    d = torch.tensor([[0.001, 0.0], [0.0, 0.0]])
    assert losses.pseudo_huber(d, a).item() == pytest.approx((2**0.5 - 1) * 0.001 / 4, rel=1e-4)


def test_hinge_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])
    fake = torch.tensor([[-2.0, 0.5], [1.0, -0.5]])
    d = (0 + 0.5 + 2 + 1) / 4 + (0 + 1.5 + 2 + 0.5) / 4
    assert losses.hinge_d(real, fake).item() == pytest.approx(d)
    assert losses.hinge_g(fake).item() == pytest.approx(0.25)


def test_r1_on_a_linear_head():
    """logits = F·w per token: ∂ΣD/∂F = w everywhere, so R1 = N‖w‖² per sample."""
    w = torch.tensor([1.0, -2.0])
    feats = [torch.randn(2, 3, 2, requires_grad=True)]
    r1 = losses.r1_penalty(feats[0] @ w, feats)
    assert r1.item() == pytest.approx(3 * 5.0)


def test_add_distillation_weighting_by_hand():
    s = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])  # (2, 1, 2, 2)
    t = torch.zeros_like(s)
    a = torch.tensor([0.25, 0.81])
    expected = (0.5 * 1.0 + 0.9 * 1.0) / 2  # c(t) = √ā_t times the mean square per sample
    assert losses.add_distillation(s, t, a).item() == pytest.approx(expected)


def test_jump_is_one_ddim_step(nets):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    for t in (779, 19):
        want = sched.step(eps, t, x).prev_sample
        got = losses.ddim_jump(
            x, eps, sched.alphas_cumprod[t], losses.alpha_at(sched.alphas_cumprod, t - 20)
        )
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# --- discriminator ----------------------------------------------------------------------------
def test_features_and_heads(dino_path):
    """Tiny DINOv2: logits (B, 4·N); a discriminator step changes the heads, never DINOv2."""
    from stylekit.engine.models import load_feature_net
    from stylekit.train.disc import Discriminator, Features, diff_augment

    torch.manual_seed(0)
    features = Features(load_feature_net(str(dino_path), device="cpu", dtype=torch.float32))
    assert features.blocks == (0, 1, 2, 3)
    disc = Discriminator(features.width, 16)
    dino_before = {k: v.clone() for k, v in features.dino.state_dict().items()}
    heads_before = {k: v.clone() for k, v in disc.state_dict().items()}
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    feats = features(diff_augment(x, gens))
    logits = disc(feats, torch.randn(3, 16))
    assert logits.shape == (3, 4 * 16)  # 28 px / patch 7 → 16 tokens per block
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-2)
    losses.hinge_d(logits, -logits).backward()
    opt.step()
    assert all(torch.equal(v, features.dino.state_dict()[k]) for k, v in dino_before.items())
    assert any(not torch.equal(v, disc.state_dict()[k]) for k, v in heads_before.items())


# --- training runs ----------------------------------------------------------------------------
def test_overfit_lowers_consistency_and_moves_disc(sd15_path, images, dino_path, tmp_path):
    """40 optimiser steps on the same 4 images with the same draws (noise, target step, w): the
    student memorises them, so the consistency loss falls clearly; the discriminator learns too."""
    from accelerate import Accelerator

    from stylekit.train.loop import Progress, Run

    cfg = config(
        sd15_path, images, dino_path, tmp_path / "o.safetensors", batch_size=4, bank_prob=0.0
    )
    run = Run(cfg, Accelerator(), Progress())
    batch = next(iter(run.loader))
    rows = [run.micro_step(batch) for _ in range(40)]  # run.state.step stays 0: same draws
    assert {"consistency", "adv_g", "disc", "r1", "loss"} <= rows[0].keys()
    cd = [r["consistency"] for r in rows]
    assert np.mean(cd[-5:]) < 0.5 * np.mean(cd[:5]), cd
    disc = [r["disc"] for r in rows]
    assert max(disc) - min(disc) > 0.05, disc


def test_log_lines(sd15_path, images, dino_path, tmp_path):
    from stylekit.train.loop import distill

    log = tmp_path / "log.jsonl"
    distill(config(sd15_path, images, dino_path, tmp_path / "l.safetensors", max_steps=3, log=log))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"consistency", "adv_g", "disc", "r1", "loss", "lr", "seconds"} <= rows[0].keys()


def test_resume_reproduces_uninterrupted_run(sd15_path, images, dino_path, tmp_path):
    """Checkpoint at step 2, resume to 4: the LoRA equals a straight 4-step run, bitwise (CPU)."""
    from stylekit.train.loop import distill

    kw = dict(max_steps=4, bank_slots=2, bank_prob=0.7, batch_size=2)
    straight = config(sd15_path, images, dino_path, tmp_path / "a.safetensors", **kw)
    distill(straight)
    first = config(sd15_path, images, dino_path, tmp_path / "b.safetensors", save_every=2, **kw)
    distill(first)
    ckpt = tmp_path / "b-checkpoints" / "checkpoint-2"
    assert (ckpt / "state.pt").is_file() and (ckpt / "process-0.pt").is_file()
    resumed = config(sd15_path, images, dino_path, tmp_path / "c.safetensors", resume=ckpt, **kw)
    distill(resumed)
    a, c = lora_tensors(tmp_path / "a.safetensors"), lora_tensors(tmp_path / "c.safetensors")
    assert a.keys() == c.keys()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_add_trains_and_writes_metadata(sd15_path, images, dino_path, tmp_path):
    from safetensors import safe_open

    from stylekit.train.loop import distill

    out = tmp_path / "add.safetensors"
    summary = distill(config(sd15_path, images, dino_path, out, method="add", max_steps=2))
    assert summary["steps"] == 2 and summary["teacher_calls_per_step"] == 2
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["stylekit.method"] == "add" and meta["stylekit.images"] == "4"
    assert meta["stylekit.teacher"] == str(sd15_path) and "stylekit.eta" not in meta


def test_cli_distill_reports_bad_files_and_writes_lora(sd15_path, images, dino_path, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in images.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    (data / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "cli.safetensors"
    args = [
        "distill",
        "--teacher",
        str(sd15_path),
        "--data",
        str(data),
        "-o",
        str(out),
        "--resolution",
        "32",
        "--rank",
        "4",
        "--max-steps",
        "2",
        "--eta",
        "0.5",
        "--feature-net",
        str(dino_path),
        "--mixed-precision",
        "no",
        "-q",
    ]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 1, result.output  # the LoRA is written, one file was skipped
    assert "broken.png" in result.output and out.is_file()
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["stylekit.eta"] == "0.5" and f.metadata()["stylekit.images"] == "4"
    bad = RUNNER.invoke(app, [*args[:-1], "--method", "xyz"])
    assert bad.exit_code == 2 and "--method" in bad.output
    cfg = RUNNER.invoke(app, [*args, "--teacher-cfg", "7"])
    assert cfg.exit_code == 2 and "--teacher-cfg" in cfg.output


def test_tensorboard_without_the_package_is_one_line(sd15_path, images, dino_path, tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    args = [
        "distill",
        "--teacher",
        str(sd15_path),
        "--data",
        str(images),
        "-o",
        str(tmp_path / "t.safetensors"),
        "--resolution",
        "32",
        "--rank",
        "4",
        "--max-steps",
        "1",
        "--adv-weight",
        "0",
        "--tensorboard",
        str(tmp_path / "tb"),
        "-q",
    ]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2 and "pip install tensorboard" in result.output


def test_two_processes_match_one(sd15_path, images, dino_path, tmp_path):
    """`accelerate launch` with 2 CPU processes × batch 1 = one process × batch 2, first update."""
    single = tmp_path / "one.safetensors"
    from stylekit.train.loop import distill

    kw = dict(max_steps=1, bank_prob=0.0, adv_weight=0.0)
    distill(config(sd15_path, images, dino_path, single, batch_size=2, **kw))
    out = tmp_path / "two.safetensors"
    env = os.environ | {
        "ACCELERATE_USE_CPU": "true",  # gloo on CPU: accelerate's --cpu alone runs one process
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "stylekit",
        "distill",
        "--teacher",
        str(sd15_path),
        "--data",
        str(images),
        "-o",
        str(out),
        "--resolution",
        "32",
        "--rank",
        "4",
        "--max-steps",
        "1",
        "--lr",
        "1e-3",
        "--warmup",
        "0",
        "--bank-prob",
        "0",
        "--adv-weight",
        "0",
        "--batch-size",
        "1",
        "-q",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_first_update(lora_tensors(single), lora_tensors(out))


def test_grad_accum_matches_the_larger_batch(sd15_path, images, dino_path, tmp_path):
    """batch 1 × 2 accumulation steps = batch 2, first update (the same examples and draws)."""
    from stylekit.train.loop import distill

    kw = dict(max_steps=1, bank_prob=0.0, adv_weight=0.0)
    distill(config(sd15_path, images, dino_path, tmp_path / "b2.safetensors", batch_size=2, **kw))
    distill(
        config(
            sd15_path,
            images,
            dino_path,
            tmp_path / "a2.safetensors",
            batch_size=1,
            grad_accum=2,
            **kw,
        )
    )
    assert_same_first_update(
        lora_tensors(tmp_path / "b2.safetensors"), lora_tensors(tmp_path / "a2.safetensors")
    )


def assert_same_first_update(one: dict, two: dict) -> None:
    assert one.keys() == two.keys()
    for k in (k for k in one if "lora_A" in k):  # B starts at 0, so A gets no gradient yet
        assert torch.equal(one[k], two[k]), k
    b_one = torch.cat([one[k].flatten() for k in one if "lora_B" in k])
    b_two = torch.cat([two[k].flatten() for k in one if "lora_B" in k])
    # Adam's first step is lr·g/(|g| + 1e-8): where |g| ≫ 1e-8 it is ±lr whatever the float
    # error of summing the gradient in another order (all-reduce, accumulation); where |g| is
    # near 1e-8 (a few time-embedding weights) a 1e-9 difference in g moves the step by up to
    # 2·lr, so only the saturated steps (|g| > ~100 · 1e-8), nearly all of them, are compared
    saturated = b_one.abs() > 0.99e-3
    assert saturated.float().mean() > 0.9
    torch.testing.assert_close(b_two[saturated], b_one[saturated], atol=1e-5, rtol=0)


# --- the LoRA in use --------------------------------------------------------------------------
def test_lora_loads_in_diffusers_and_stylize(sd15_path, images, dino_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stylekit.train.loop import distill

    lora = tmp_path / "std.safetensors"
    distill(config(sd15_path, images, dino_path, lora, max_steps=3, lr=3e-2, adv_weight=0.0))
    pipe = StableDiffusionPipeline.from_pretrained(str(sd15_path))
    pipe.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="std")
    assert "std" in pipe.unet.peft_config and pipe.unet.peft_config["std"].r == 4

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        src
    )
    flags = [
        "--model",
        str(sd15_path),
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--seed",
        "1",
        "--strength",
        "0.75",
        "-q",
    ]

    def run(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        result = RUNNER.invoke(app, ["stylize", str(src), "-o", str(out), *flags, *extra])
        assert result.exit_code == 0, result.output
        return np.asarray(Image.open(out), dtype=np.float64)

    base = run("base", "--accelerator", "none")
    with_lora = run("lora", "--accelerator", str(lora))
    zero = run("zero", "--accelerator", "none", "--lora", f"{lora}:0")
    assert np.abs(with_lora - base).mean() > 0.5
    assert np.array_equal(zero, base)


def test_sdxl_teacher_trains(sdxl_path, images, dino_path, tmp_path):
    """SDXL: added conditioning (pooled text, size ids); the heads' condition is the pooled 32-d."""
    from stylekit.train.loop import distill

    for method in ("std", "add"):
        out = tmp_path / f"{method}.safetensors"
        cfg = config(sdxl_path, images, dino_path, out, method=method, max_steps=1, batch_size=1)
        assert distill(cfg)["steps"] == 1 and out.is_file()


def test_scan_videos_captions_and_bad_files(images, tmp_path):
    from stylekit.media.video import ffmpeg_exe
    from stylekit.train.data import TrainingImages, scan

    clip = tmp_path / "clip.mp4"
    subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=64x48:rate=10:duration=2",
            "-pix_fmt",
            "yuv420p",
            str(clip),
        ],
        check=True,
    )
    (tmp_path / "clip.txt").write_text("a test pattern")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    skipped: list[str] = []
    examples = scan(
        [str(images), str(tmp_path)],
        prompt="default",
        frames_per_video=3,
        resolution=32,
        skipped=skipped.append,
    )
    assert len(examples) == 4 + 3
    assert [e.caption for e in examples[:4]] == ["a red cat", "default", "default", "default"]
    assert all(e.caption == "a test pattern" and e.frame.height == 32 for e in examples[4:])
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]
    item = TrainingImages(examples, resolution=32, seed=0)[5]
    assert (
        item["pixels"].shape == (3, 32, 32)
        and -1 <= item["pixels"].min() <= item["pixels"].max() <= 1
    )
