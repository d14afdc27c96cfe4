"""The networks a training step calls: one UNet that is the student (its LoRA on) or the frozen
teacher (LoRA off), the frozen VAE and text encoders, all under the run's autocast."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from stylekit.engine.latents import scale_latents, unscale

LORA_TARGETS = (  # every module whose name ends so gets a LoRA (STD's release; SD1.5 and SDXL)
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def add_lora(unet, rank: int) -> list[torch.nn.Parameter]:
    """Put a PEFT LoRA (rank r, α = r, no dropout) on `unet`; freeze the rest; return the LoRA's
    parameters in fp32 (they train in fp32 whatever the frozen weights' dtype)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        init_lora_weights="gaussian",
        target_modules=list(LORA_TARGETS),
    )
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


@contextmanager
def teacher_mode(unet):
    """The UNet without its LoRA for the duration: the frozen teacher."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@dataclass
class Nets:
    """Calls into the models for one process; `student` is the accelerate-wrapped UNet."""

    student: torch.nn.Module  # prepared (DDP under accelerate launch): the only call with grad
    unet: torch.nn.Module  # the same UNet unwrapped: teacher and no-grad student calls
    model: object  # stylekit's LoadedModel: VAE, text encoders, family
    ac: torch.Tensor  # ā_t, fp32 on the device
    autocast: object  # accelerator.autocast
    text_cache: dict = field(default_factory=dict)
    teacher_calls: int = 0  # teacher UNet evaluations (cond and uncond count one each)

    @property
    def device(self) -> torch.device:
        return self.ac.device

    def alphas(self, t: torch.Tensor) -> torch.Tensor:
        """ā at timesteps t (B,), t < 0 read as ā_0, shaped (B, 1, 1, 1)."""
        return self.ac[t.clamp(min=0)].view(-1, 1, 1, 1)

    def added(self, pooled: torch.Tensor, x: torch.Tensor) -> dict | None:
        """SDXL's added conditioning (pooled text, size ids) for latents x; None for SD 1.x/2.x."""
        if self.model.family != "sdxl":
            return None
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        ids = torch.tensor([h, w, 0, 0, h, w], device=x.device, dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": ids.expand(x.shape[0], 6)}

    def eps(self, x, t, embeds, pooled, *, grad: bool = False) -> torch.Tensor:
        """The student's ε̂ (fp32); with grad through the wrapped UNet, else no grad."""
        net = self.student if grad else self.unet
        with torch.set_grad_enabled(grad), self.autocast():
            out = net(x, t, encoder_hidden_states=embeds, added_cond_kwargs=self.added(pooled, x))
        return out.sample.float()

    @torch.no_grad()
    def teacher_eps(self, x, t, embeds, pooled, w: torch.Tensor) -> torch.Tensor:
        """The teacher's guided ε̂ = ε_c + w (ε_c − ε_u), uncond = the empty prompt; w (B,)."""
        u_embeds, u_pooled = self.text([""] * x.shape[0])
        self.teacher_calls += 2
        with teacher_mode(self.unet), self.autocast():
            out = self.unet(
                torch.cat([x, x]),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([u_embeds, embeds]),
                added_cond_kwargs=self.added(torch.cat([u_pooled, pooled]), torch.cat([x, x])),
            ).sample.float()
        e_u, e_c = out.chunk(2)
        return e_c + w.view(-1, 1, 1, 1) * (e_c - e_u)

    @torch.no_grad()
    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings (B, 77, D) and pooled embeddings (B, P), each caption encoded once."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.text_cache]
        for caption in missing:
            self.text_cache[caption] = self._encode(caption)
        embeds, pooled = zip(*(self.text_cache[c] for c in captions), strict=True)
        return torch.stack(embeds), torch.stack(pooled)

    def _encode(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.model.pipe
        if self.model.family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(
                caption, device=self.device, do_classifier_free_guidance=False
            )
            return embeds[0], pooled[0]
        tok = pipe.tokenizer(
            caption,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = pipe.text_encoder(tok.input_ids.to(self.device))
        return out.last_hidden_state[0], out.pooler_output[0]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [−1, 1] → scaled latents (B, 4, H/8, W/8), one posterior draw each."""
        vae = self.model.vae
        with self.autocast():
            dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
        z = dist.mean.float() + dist.std.float() * noise.to(self.device)
        return scale_latents(vae, z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels in about [−1, 1], differentiable (the VAE stays frozen)."""
        vae = self.model.vae
        with self.autocast():
            return vae.decode(unscale(vae, z).to(vae.dtype)).sample.float()


def randn(shape, generators: list[torch.Generator], device) -> torch.Tensor:
    """One standard normal draw of `shape` per sample, each from that sample's generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def uniform(generators: list[torch.Generator], lo: float, hi: float, device) -> torch.Tensor:
    """One U[lo, hi) draw per sample (B,)."""
    return torch.stack([lo + (hi - lo) * torch.rand((), generator=g) for g in generators]).to(
        device
    )
