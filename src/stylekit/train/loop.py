"""The one training loop for STD and ADD, on accelerate.

Everything that differs between one process and many goes through `accelerate`: the UNet's LoRA
and the discriminator heads are DDP-wrapped, the data loader is sharded, gradients are averaged
and accumulated. Every random draw a sample needs comes from a generator seeded by (seed,
optimiser step, epoch, example index), so a run's numbers do not depend on how the batch is split
over processes and accumulation steps, and a resumed run continues exactly.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stylekit.errors import SetupError, UsageError
from stylekit.train.bank import Bank
from stylekit.train.disc import Discriminator, Features, diff_augment
from stylekit.train.losses import hinge_d, hinge_g, r1_penalty
from stylekit.train.nets import Nets, add_lora

METHODS = ("std", "add")
DEFAULT_CFG = {"std": (6.0, 16.0), "add": (1.0, 15.0)}  # teacher guidance scale ranges
DEFAULT_ADV = {"std": 0.7, "add": 1.0}
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class DistillConfig:
    """One training run; defaults follow STD's released image script (docs/distillation.md)."""

    method: str
    teacher: str
    data: list[str]
    output: Path
    prompt: str = ""  # caption for images without a .txt beside them
    frames_per_video: int = 8
    resolution: int = 512
    eta: float = 0.75  # STD: the strength whose trajectory is distilled
    gamma: float = 0.5  # STD: target steps lie in [k − ceil(50 η (1 − γ)), k − 1]
    bank_slots: int = 4  # STD: 0 = no bank, full teacher rollouts
    bank_prob: float = 0.7  # STD: ρ, probability of continuing a stored trajectory
    adv_weight: float | None = None  # None: 0.7 (STD) or 1.0 (ADD); 0 turns the adversary off
    distill_weight: float = 2.5  # ADD: λ
    teacher_cfg: tuple[float, float] | None = None  # None: 6–16 (STD) or 1–15 (ADD)
    r1_weight: float = 1e-5
    rank: int = 64
    lr: float = 5e-6
    disc_lr: float = 1e-4
    batch_size: int = 1  # per process
    grad_accum: int = 1
    mixed_precision: str | None = (
        None  # None: accelerate's own setting (`accelerate config`), else no
    )
    max_steps: int = 1000
    warmup: int = 500
    clip: float = 10.0
    save_every: int = 0
    checkpoints: Path | None = None
    resume: Path | None = None
    log: Path | None = None
    tensorboard: Path | None = None  # a TensorBoard log folder (needs the tensorboard package)
    feature_net: str = "facebook/dinov2-small"
    seed: int = 0
    allow_pickle: bool = False

    def __post_init__(self):
        if self.mixed_precision is None:
            self.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r}: choose std or add")
        if self.mixed_precision not in PRECISIONS:
            raise UsageError(f"--mixed-precision {self.mixed_precision!r}: choose no, fp16 or bf16")
        checks = [
            (0 < self.eta <= 1, f"--eta must be in (0, 1], got {self.eta}"),
            (0 <= self.gamma < 1, f"--gamma must be in [0, 1), got {self.gamma}"),
            (0 <= self.bank_prob <= 1, f"--bank-prob must be in [0, 1], got {self.bank_prob}"),
            (self.bank_slots >= 0, "--bank-slots must be >= 0"),
            (self.rank >= 1, "--rank must be >= 1"),
            (self.max_steps >= 1, "--max-steps must be >= 1"),
            (
                self.batch_size >= 1 and self.grad_accum >= 1,
                "--batch-size and --grad-accum must be >= 1",
            ),
            (
                self.resolution >= 8 and self.resolution % 8 == 0,
                "--resolution must be a multiple of 8",
            ),
            (
                self.output.suffix == ".safetensors",
                f"-o {self.output}: the LoRA file must end in .safetensors",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.eta * 50 < 2:
            raise UsageError(f"--eta {self.eta}: STD needs η >= 0.04 (two grid steps)")
        self.adv_weight = DEFAULT_ADV[self.method] if self.adv_weight is None else self.adv_weight
        self.teacher_cfg = self.teacher_cfg or DEFAULT_CFG[self.method]
        self.warmup = min(self.warmup, self.max_steps)
        if self.checkpoints is None:
            self.checkpoints = self.output.with_name(self.output.stem + "-checkpoints")


@dataclass
class Progress:
    """What the loop tells its caller: data problems and each optimiser step."""

    skipped: Callable[[str], None] = lambda line: None
    step: Callable[[int, dict], None] = lambda step, logs: None
    notice: Callable[[str], None] = lambda line: None


@dataclass
class RunState:
    step: int = 0  # optimiser updates done
    micro: int = 0  # micro-batches done (global count, the same on every process)
    logs: dict = field(default_factory=dict)


def sample_generators(seed: int, step: int, epoch: int, indices) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, optimiser step, epoch, example index): the same
    draws however the step's examples are split over processes and accumulation micro-steps."""
    return [
        torch.Generator().manual_seed(hash((seed, step, epoch, int(i))) & 0x7FFFFFFFFFFF)
        for i in indices
    ]


def distill(cfg: DistillConfig, progress: Progress | None = None) -> dict:
    """Train and write the LoRA; return a summary (steps, images, teacher calls, seconds)."""
    try:
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin
    except ImportError:
        raise SetupError(
            "stylekit distill needs accelerate: pip install 'stylekit[train]'"
        ) from None

    progress = progress or Progress()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
    )
    run = Run(cfg, accelerator, progress)
    return run.train()


class Run:
    """One process's part of a training run: models, optimisers, data, bank."""

    def __init__(self, cfg: DistillConfig, accelerator, progress: Progress):
        from torch.utils.data import DataLoader

        from stylekit.engine.sampling import alphas_cumprod
        from stylekit.train.data import EpochPermutation, TrainingImages, scan

        self.cfg, self.acc, self.progress = cfg, accelerator, progress
        main = accelerator.is_main_process
        self.examples = scan(
            cfg.data,
            prompt=cfg.prompt,
            frames_per_video=cfg.frames_per_video,
            resolution=cfg.resolution,
            skipped=progress.skipped if main else (lambda line: None),
        )
        model = load_teacher(cfg, accelerator.device)
        unet, device = model.unet, accelerator.device
        torch.manual_seed(cfg.seed)  # the LoRA's and the heads' initial weights
        lora = add_lora(unet, cfg.rank)
        self.adversarial = cfg.adv_weight > 0
        opt_g = adamw(lora, cfg.lr)
        self.sched_g = cosine(opt_g, cfg)
        self.data = TrainingImages(self.examples, resolution=cfg.resolution, seed=cfg.seed)
        self.sampler = EpochPermutation(self.data, cfg.seed)
        loader = DataLoader(self.data, batch_size=cfg.batch_size, sampler=self.sampler)
        if self.adversarial:
            self.features, disc = adversary(cfg, model, device)
            opt_d = adamw(disc.parameters(), cfg.disc_lr)
            self.sched_d = cosine(opt_d, cfg)
            student, self.disc, self.opt_g, self.opt_d, self.loader = accelerator.prepare(
                unet, disc, opt_g, opt_d, loader
            )
        else:
            student, self.opt_g, self.loader = accelerator.prepare(unet, opt_g, loader)
        self.unet, self.model, self.lora = unet, model, lora
        ac = alphas_cumprod(dict(model.pipe.scheduler.config)).to(device)
        self.nets = Nets(student, unet, model, ac, accelerator.autocast)
        self.bank = Bank(cfg.bank_slots if cfg.method == "std" else 0)
        self.state = RunState()
        if cfg.resume is not None:
            load_checkpoint(self, cfg.resume)

    # --- one micro-step -----------------------------------------------------------------------
    def generate(self, batch, gens):
        from stylekit.train import add, std

        cfg = self.cfg
        if cfg.method == "std":
            settings = std.StdSettings(cfg.eta, cfg.gamma, cfg.bank_prob, cfg.teacher_cfg)
            return std.generator_step(
                self.nets, self.bank, batch, gens, settings, adversarial=self.adversarial
            )
        settings = add.AddSettings(cfg.distill_weight, cfg.teacher_cfg)
        return add.generator_step(self.nets, batch, gens, settings, adversarial=self.adversarial)

    def micro_step(self, batch) -> dict:
        cfg, acc = self.cfg, self.acc
        gens = sample_generators(
            cfg.seed, self.state.step, self.data.epoch, batch["index"].tolist()
        )
        models = (self.nets.student, self.disc) if self.adversarial else (self.nets.student,)
        with acc.accumulate(*models):
            out = self.generate(batch, gens)
            loss, logs = out.loss, dict(out.logs)
            if self.adversarial:
                raw = acc.unwrap_model(self.disc)
                raw.requires_grad_(False)  # the generator's loss does not train the heads
                g_adv = hinge_g(raw(self.features(diff_augment(out.fake, gens)), out.cond))
                raw.requires_grad_(True)
                loss = loss + cfg.adv_weight * g_adv
                logs["adv_g"] = g_adv.item()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.lora, cfg.clip)
            self.opt_g.step()
            self.opt_g.zero_grad()
            if self.adversarial:
                logs.update(self.disc_step(out, gens))
        logs["loss"] = loss.item()
        return logs

    def disc_step(self, out, gens) -> dict:
        """Hinge loss on detached fakes and reals, plus R1 on the real features."""
        with torch.no_grad():
            real = [f.requires_grad_(True) for f in self.features(diff_augment(out.real, gens))]
            fake = self.features(diff_augment(out.fake.detach(), gens))
        b = out.cond.shape[0]
        feats = [torch.cat([r, f]) for r, f in zip(real, fake, strict=True)]
        logits = self.disc(feats, torch.cat([out.cond, out.cond]))
        loss_d = hinge_d(logits[:b], logits[b:])
        penalty = r1_penalty(logits[:b], real)
        self.acc.backward(loss_d + self.cfg.r1_weight * penalty)
        self.opt_d.step()
        self.opt_d.zero_grad()
        return {"disc": loss_d.item(), "r1": penalty.item()}

    # --- the loop ------------------------------------------------------------------------------
    def batches(self):
        """Micro-batches from where the run stands, epoch after epoch."""
        per_epoch = len(self.loader)
        while True:
            epoch, offset = divmod(self.state.micro, per_epoch)
            self.sampler.start_epoch(epoch)
            loader = self.acc.skip_first_batches(self.loader, offset) if offset else self.loader
            yield from loader

    def train(self) -> dict:
        cfg, acc, state = self.cfg, self.acc, self.state
        start, calls0 = time.perf_counter(), self.nets.teacher_calls
        last, totals, count = time.perf_counter(), {}, 0
        log = open_log(cfg.log) if acc.is_main_process and cfg.log else None
        board = open_board(cfg.tensorboard) if acc.is_main_process and cfg.tensorboard else None
        try:
            for batch in self.batches():
                if state.step >= cfg.max_steps:
                    break
                logs = self.micro_step(batch)
                state.micro += 1
                for k, v in logs.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
                if not acc.sync_gradients:
                    continue
                self.sched_g.step()
                if self.adversarial:
                    self.sched_d.step()
                state.step += 1
                now = time.perf_counter()
                state.logs = {k: v / count for k, v in totals.items()}
                state.logs.update(lr=self.sched_g.get_last_lr()[0], seconds=now - last)
                totals, count, last = {}, 0, now
                if log:
                    log.write(json.dumps({"step": state.step, **state.logs}) + "\n")
                    log.flush()
                if board:
                    for key, value in state.logs.items():
                        board.add_scalar(f"distill/{key}", value, state.step)
                self.progress.step(state.step, state.logs)
                if (
                    cfg.save_every
                    and state.step % cfg.save_every == 0
                    and state.step < cfg.max_steps
                ):
                    save_checkpoint(self, cfg.checkpoints / f"checkpoint-{state.step}")
        finally:
            if log:
                log.close()
            if board:
                board.close()
        save_lora(self)
        acc.wait_for_everyone()
        return {
            "steps": state.step,
            "images": len(self.examples),
            "teacher_calls_per_step": (self.nets.teacher_calls - calls0) / max(1, state.step),
            "seconds": time.perf_counter() - start,
        }


def load_teacher(cfg: DistillConfig, device: torch.device):
    """The teacher pipeline through stylekit's one loader, frozen weights in the run's precision."""
    from stylekit.engine import models

    dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[cfg.mixed_precision]
    name = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type
    spec = models.ModelSpec(
        cfg.teacher, accelerator="none", device=name, dtype=dtype, allow_pickle=cfg.allow_pickle
    )
    model = models.load(spec)
    prediction = model.pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UsageError(
            f"teacher {cfg.teacher}: distill trains ε-prediction teachers only ({prediction})"
        )
    return model


def adversary(cfg: DistillConfig, model, device: torch.device):
    """The frozen DINOv2 features and fresh heads conditioned on the pooled text embedding."""
    from stylekit.engine import models

    features = Features(models.load_feature_net(cfg.feature_net, device=device, dtype=model.dtype))
    unet = model.unet.config
    if model.family == "sdxl":  # pooled text + six size ids feed the added embedding
        cond_dim = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
    else:
        cond_dim = model.pipe.text_encoder.config.hidden_size
    return features.to(device), Discriminator(features.width, cond_dim).to(device)


def adamw(params, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def cosine(optimizer, cfg: DistillConfig):
    """Linear warm-up, then cosine decay to 0 at `max_steps`."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        "cosine", optimizer, num_warmup_steps=cfg.warmup, num_training_steps=cfg.max_steps
    )


def open_board(folder: Path):
    """A TensorBoard writer for `folder`; a clear error when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SetupError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(str(folder))


def open_log(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8")


# --- checkpoints and the LoRA file ---------------------------------------------------------------
def trainable_state(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in run.unet.named_parameters() if p.requires_grad}


def save_checkpoint(run: Run, folder: Path) -> None:
    """LoRA, heads, optimisers, schedulers and step (main process); RNG and bank per process."""
    acc = run.acc
    folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        shared = {
            "lora": trainable_state(run),
            "opt_g": run.opt_g.state_dict(),
            "sched_g": run.sched_g.state_dict(),
            "step": run.state.step,
            "micro": run.state.micro,
        }
        if run.adversarial:
            shared |= {
                "disc": acc.unwrap_model(run.disc).state_dict(),
                "opt_d": run.opt_d.state_dict(),
                "sched_d": run.sched_d.state_dict(),
            }
        atomic_torch_save(shared, folder / "state.pt")
    own = {"bank": run.bank.state_dict(), "rng": torch.get_rng_state(), "text": None}
    atomic_torch_save(own, folder / f"process-{acc.process_index}.pt")
    acc.wait_for_everyone()


def load_checkpoint(run: Run, folder: Path) -> None:
    """Continue exactly where `save_checkpoint` left off (same number of processes)."""
    shared_file, own_file = folder / "state.pt", folder / f"process-{run.acc.process_index}.pt"
    for f in (shared_file, own_file):
        if not f.is_file():
            raise UsageError(
                f"--resume {folder}: no {f.name} (not a checkpoint of this run, or another process count)"
            )
    shared = torch.load(shared_file, map_location="cpu", weights_only=False)
    own = torch.load(own_file, map_location="cpu", weights_only=False)
    params = dict(run.unet.named_parameters())
    with torch.no_grad():
        for name, value in shared["lora"].items():
            params[name].copy_(value)
    run.opt_g.load_state_dict(shared["opt_g"])
    run.sched_g.load_state_dict(shared["sched_g"])
    if run.adversarial:
        run.acc.unwrap_model(run.disc).load_state_dict(shared["disc"])
        run.opt_d.load_state_dict(shared["opt_d"])
        run.sched_d.load_state_dict(shared["sched_d"])
    run.state.step, run.state.micro = shared["step"], shared["micro"]
    run.bank.load_state_dict(own["bank"])
    torch.set_rng_state(own["rng"])


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def lora_metadata(run: Run) -> dict[str, str]:
    cfg = run.cfg
    meta = {
        "method": cfg.method,
        "teacher": cfg.teacher,
        "images": str(len(run.examples)),
        "rank": str(cfg.rank),
        "alpha": str(cfg.rank),
        "steps": str(run.state.step),
    }
    if cfg.method == "std":
        meta |= {"eta": f"{cfg.eta:g}", "gamma": f"{cfg.gamma:g}"}
    return {f"stylekit.{k}": v for k, v in meta.items()}


def save_lora(run: Run) -> None:
    """Write the LoRA in diffusers' format (`load_lora_weights` reads it), with the run's metadata."""
    import tempfile

    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    acc = run.acc
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    out = run.cfg.output
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(run.unet)  # PEFT keys (lora_A/lora_B), as diffusers saves
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        type(run.model.pipe).save_lora_weights(
            tmp, unet_lora_layers=layers, weight_name="lora.safetensors"
        )
        with safe_open(f"{tmp}/lora.safetensors", framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
        meta |= lora_metadata(run)
        save_file(tensors, f"{tmp}/final.safetensors", metadata=meta)
        Path(f"{tmp}/final.safetensors").replace(out)
