"""Random-weight models for tests and benchmarks; the CLI never uses it.

Each builder writes a real diffusers-format folder (or file) with random weights, deterministic
from `seed`, so tests go through the same `from_pretrained` / `load_lora_weights` /
`load_ip_adapter` / `from_single_file` code a user's downloaded model does, with no network.
Random weights show cost and correctness, never quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

TOKENIZER_MAX_LENGTH = 77  # CLIP's context length; every SD text encoder expects it
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
IP_ADAPTER_WEIGHTS = "ip-adapter.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(dir) looks for

# Words whose letters get BPE merges, so prompts tokenize into a few multi-letter tokens.
_WORDS = (
    "a an the of in on with and photo painting drawing sketch style portrait landscape city "
    "street forest mountain river sea sky cloud sun night cat dog bird house tree flower "
    "oil watercolor ink pencil anime pixel art texture brick stone wood grass red green blue "
    "black white bright dark soft detailed high quality"
).split()

# Scheduler configs as the real SD1.5 / SDXL base repositories ship them (scaled_linear betas).
_SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1 (768 px) is a v-prediction model: its scheduler says so.
_SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


# --- tokenizer ------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """Return the printable character byte-level BPE uses for each byte 0..255 (GPT-2's table)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    unused = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(unused)) for b in range(256)]


def _merges(words: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """Return left-to-right merges that build each word (with CLIP's `</w>` end marker)."""
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
    return merges


def write_tokenizer(path: str | Path, *, pad_token: str = EOS) -> Path:
    """Write a small byte-level BPE CLIP tokenizer that `CLIPTokenizer.from_pretrained` loads.

    About 700 tokens: the 256 bytes, the same with `</w>`, merges for a few common prompt words,
    then `<|startoftext|>` and `<|endoftext|>` last (as in CLIP). `model_max_length` is 77.
    SD1.5 pads with `<|endoftext|>`, SDXL's second tokenizer with `"!"`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges = _merges(_WORDS)
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges), BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        "do_lower_case": True,
        **specials,
    }
    _write_json(path / "vocab.json", vocab)
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "special_tokens_map.json", specials)
    return path


def _load_tokenizer(path: Path, *, pad_token: str = EOS):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tokenizer(path, pad_token=pad_token))


# --- component configs ----------------------------------------------------------------------


def _sd15_unet_config(size: str, in_channels: int) -> dict:
    if size == "full":  # diffusers' defaults are SD1.5's UNet (320/640/1280/1280, 2 layers)
        return {
            "sample_size": 64,
            "in_channels": in_channels,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        }
    return {
        "sample_size": 32,
        "in_channels": in_channels,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
    }


def _sd2_unet_config(in_channels: int) -> dict:
    # SD 2.x differs from SD 1.x where stylekit's family rule looks: linear projections into the
    # transformer blocks and per-level head counts, and cross-attention as wide as its OpenCLIP
    # text encoder (1024 in the real model, 64 here against the tiny SD1.5's 32).
    return {
        **_sd15_unet_config("tiny", in_channels),
        "cross_attention_dim": 64,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
    }


# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, where it differs from the defaults
_SDXL_FULL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,  # CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280) concatenated
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + pooled bigG 1280
}


def _sdxl_unet_config(size: str = "tiny") -> dict:
    if size == "full":
        return dict(_SDXL_FULL_UNET)
    # (Down, CrossAttnDown) / (CrossAttnUp, Up) with 2 layers, like SDXL's last levels: up block 0
    # has 3 attentions, so InstantStyle's style layer `up_blocks.0.attentions.1` exists.
    return {
        "sample_size": 32,
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "cross_attention_dim": 64,  # the two text encoders' hidden states, concatenated
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,  # 6 time ids x 8 + pooled text 32
    }


def _vae_config(size: str, scaling_factor: float, **extra) -> dict:
    channels = (128, 256, 512, 512) if size == "full" else (32, 32, 32, 32)
    return extra | {
        "block_out_channels": channels,  # four levels: scale factor 8 like SD
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2 if size == "full" else 1,
        "latent_channels": 4,
        "sample_size": 512 if size == "full" else 64,
        "scaling_factor": scaling_factor,
    }


_CLIP_TEXT_DIMS = {  # hidden size, MLP size, layers, heads, activation
    "tiny": (32, 64, 2, 4, "quick_gelu"),
    "full": (768, 3072, 12, 12, "quick_gelu"),  # CLIP ViT-L/14: SD1.5's and SDXL's first
    "bigG": (1280, 5120, 32, 20, "gelu"),  # OpenCLIP ViT-bigG/14: SDXL's second text encoder
}


def _clip_text_config(size: str, vocab_size: int, **extra):
    from transformers import CLIPTextConfig

    hidden, mlp, layers, heads, act = _CLIP_TEXT_DIMS[size]
    return CLIPTextConfig(
        **{
            "hidden_size": hidden,
            "intermediate_size": mlp,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "vocab_size": vocab_size,
            "max_position_embeddings": TOKENIZER_MAX_LENGTH,
            "hidden_act": act,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
            **extra,
        }
    )


def _open_clip_text_config(vocab_size: int):
    """A tiny OpenCLIP-like text encoder as SD 2.x's: GELU, wider than the tiny CLIP (64 vs 32)."""
    return _clip_text_config(
        "tiny", vocab_size, hidden_size=64, intermediate_size=128, hidden_act="gelu"
    )


# --- pipelines ------------------------------------------------------------------------------


def build_sd15(
    path: str | Path,
    *,
    seed: int = 0,
    size: Literal["tiny", "full"] = "tiny",
    in_channels: int = 4,
    dtype: torch.dtype = torch.float32,
    prediction_type: str = "epsilon",
) -> Path:
    """Write an SD1.5-layout pipeline folder with random weights and return its path.

    `size="tiny"` builds in well under a second; `size="full"` is the real SD1.5 architecture
    (859 M UNet parameters) for benchmarks. `in_channels=9` gives an inpainting UNet;
    `prediction_type` ("epsilon", "v_prediction", "sample") goes into the scheduler config.
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    return _build_sd(
        Path(path),
        unet_config=_sd15_unet_config(size, in_channels),
        text_config=lambda vocab: _clip_text_config(size, vocab),
        scheduler_config=_with_prediction(_SD15_SCHEDULER, prediction_type),
        pad_token=EOS,
        vae_size=size,
        seed=seed,
        dtype=dtype,
    )


def build_sd2(
    path: str | Path,
    *,
    seed: int = 0,
    in_channels: int = 4,
    prediction_type: str = "v_prediction",
) -> Path:
    """Write a tiny SD 2.x-layout pipeline folder (v-prediction, as SD 2.1 768) and return its path.

    What tells SD 2.x from SD 1.x is kept: linear transformer projections and per-level head
    counts in the UNet, an OpenCLIP-like text encoder (GELU, hidden 64 where the tiny SD1.5 has
    32), and a tokenizer that pads with "!". `prediction_type="epsilon"` is SD 2.x base / SD-Turbo.
    """
    return _build_sd(
        Path(path),
        unet_config=_sd2_unet_config(in_channels),
        text_config=_open_clip_text_config,
        scheduler_config=_with_prediction(_SD2_SCHEDULER, prediction_type),
        pad_token="!",
        vae_size="tiny",
        seed=seed,
        dtype=torch.float32,
    )


def _with_prediction(config: dict, prediction_type: str) -> dict:
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if config.get("prediction_type", "epsilon") == prediction_type:
        return config
    return {**config, "prediction_type": prediction_type}


def _build_sd(
    path: Path,
    *,
    unet_config: dict,
    text_config,
    scheduler_config: dict,
    pad_token: str,
    vae_size: str,
    seed: int,
    dtype: torch.dtype,
) -> Path:
    """Write an SD 1.x/2.x pipeline folder (inpainting when the UNet takes 9 channels)."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    tokenizer = _load_tokenizer(path / "tokenizer", pad_token=pad_token)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**_vae_config(vae_size, scaling_factor=0.18215))
        text_encoder = CLIPTextModel(text_config(len(tokenizer)))
    inpaint = unet_config["in_channels"] == 9
    pipeline_class = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    if dtype != torch.float32:
        for model in (unet, vae, text_encoder):
            model.to(dtype)
    pipe = pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    _save_pipeline(pipe, path, scheduler_config)
    return path


def build_sdxl(
    path: str | Path,
    *,
    seed: int = 0,
    size: Literal["tiny", "full"] = "tiny",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write an SDXL-layout pipeline folder (two text encoders) and return its path.

    `size="tiny"` builds in about a second; `size="full"` is the real SDXL base architecture
    (2.6 G UNet parameters, CLIP ViT-L and OpenCLIP ViT-bigG text encoders, VAE) for benchmarks:
    its UNet and VAE are filled in `dtype` directly (`random_unet`), so fp16 needs ~7 GB of RAM and
    disk, never an fp32 copy of the UNet.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    path = Path(path)
    tokenizer = _load_tokenizer(path / "tokenizer")
    tokenizer_2 = _load_tokenizer(path / "tokenizer_2", pad_token="!")  # as SDXL's
    vocab_size = len(tokenizer)
    vae_config = _vae_config(size, scaling_factor=0.13025, force_upcast=True)
    big, proj = ("bigG", 1280) if size == "full" else ("tiny", 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if size == "full":
            unet = random_unet("sdxl", size="full", dtype=dtype, seed=seed)
            vae = _materialize(_on_meta(AutoencoderKL, vae_config), dtype, "cpu", seed + 1)
        else:
            unet = UNet2DConditionModel(**_sdxl_unet_config())
            vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(_clip_text_config(size, vocab_size))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(big, vocab_size, projection_dim=proj)
        )
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.to(dtype)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(_SDXL_SCHEDULER),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,  # as stabilityai/stable-diffusion-xl-base-1.0
    )
    _save_pipeline(pipe, path, _SDXL_SCHEDULER)
    return path


def random_unet(
    family: Literal["sd15", "sdxl"],
    *,
    size: Literal["tiny", "full"] = "full",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """A `UNet2DConditionModel` of the family's architecture with random weights, in memory.

    Built on the meta device and filled in `dtype` on `device` (`_materialize`): a full SDXL UNet
    in bf16 takes its 5 GB and never an fp32 copy. For benchmarks that need only the UNet.
    """
    from diffusers import UNet2DConditionModel

    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family must be 'sd15' or 'sdxl', got {family!r}")
    config = _sd15_unet_config(size, 4) if family == "sd15" else _sdxl_unet_config(size)
    return _materialize(_on_meta(UNet2DConditionModel, config), dtype, device, seed)


def _on_meta(cls, config: dict):
    """The model built on the meta device: its layers and shapes, no memory."""
    with torch.device("meta"):
        return cls(**config)


@torch.no_grad()
def _materialize(model, dtype: torch.dtype, device, seed: int):
    """Give a meta-device model random weights in `dtype`: PyTorch's default scale for linear and
    convolution weights (uniform ±1/√fan_in), zero biases, unit norm weights.

    Only for models without buffers (diffusers' UNet and VAE have none)."""
    if any(True for _ in model.buffers()):
        raise ValueError(f"{type(model).__name__} has buffers; _materialize would leave them empty")
    model.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            bound = param[0].numel() ** -0.5  # fan_in: inputs (x kernel size) of one output
            param.uniform_(-bound, bound, generator=generator)
        elif name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.zero_()
    return model


def build_tiny_vae(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny `AutoencoderTiny` (TAESD layout: scale factor 8, 4 latent channels)."""
    from diffusers import AutoencoderTiny

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderTiny(
            encoder_block_out_channels=(16, 16, 16, 16),
            decoder_block_out_channels=(16, 16, 16, 16),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
            latent_channels=4,
        )
    vae.save_pretrained(path)
    return path


def _scheduler(config: dict):
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def _save_pipeline(pipe, path: Path, scheduler_config: dict) -> None:
    pipe.save_pretrained(path, safe_serialization=True)
    # Keep the real repositories' scheduler keys (e.g. clip_sample) that the class itself drops.
    saved = path / "scheduler" / "scheduler_config.json"
    _write_json(saved, {**json.loads(saved.read_text()), **scheduler_config})


# --- LoRA -----------------------------------------------------------------------------------


def build_lora(
    model_path: str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    rank: int = 4,
    strength: float = 0.5,
) -> Path:
    """Write a random UNet LoRA for the model at `model_path`; return the `.safetensors` file.

    Each layer's update `up @ down` is scaled to `strength` times the norm of the weight it
    modifies, so the effect is plain to see while outputs stay finite.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet")
    base = {key: weight.float().norm() for key, weight in unet.state_dict().items()}
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=LORA_TARGETS
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    for key in [k for k in layers if k.endswith(".lora.up.weight")]:
        down = layers[key.replace(".lora.up.", ".lora.down.")]
        target = base[key.replace(".lora.up.weight", ".weight")]
        layers[key] = layers[key] * (strength * target / (layers[key] @ down).norm())
    out_path = Path(out_path)
    _pipeline_class(model_path).save_lora_weights(
        out_path, unet_lora_layers=layers, weight_name=LORA_WEIGHTS
    )
    return out_path / LORA_WEIGHTS


def _pipeline_class(model_path: str | Path):
    import diffusers

    index = json.loads((Path(model_path) / "model_index.json").read_text())
    return getattr(diffusers, index["_class_name"])


# --- IP-Adapter -----------------------------------------------------------------------------


def build_ip_adapter(
    model_path: str | Path, out_dir: str | Path, *, seed: int = 0, image_embed_dim: int = 32
) -> Path:
    """Write a random plain IP-Adapter for the UNet at `model_path` into `out_dir`; return it.

    Layout as the released adapters: `out_dir/ip-adapter.safetensors` (keys `image_proj.*` for
    the image projection, `ip_adapter.{n}.to_{k,v}_ip.weight` for the n-th attention processor
    counting self- and cross-attention, so cross-attention is 1, 3, 5, ...) and a tiny
    `CLIPVisionModelWithProjection` in `out_dir/image_encoder`. Load with
    `pipe.load_ip_adapter(out_dir, subfolder="", weight_name="ip-adapter.safetensors")`; the
    pipeline then builds its own `CLIPImageProcessor` at the encoder's 32 px input size.
    """
    out_dir = Path(out_dir)
    unet = _meta_unet(model_path)
    cross_dim = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(seed)
    tokens = 4  # a plain IP-Adapter projects the image embedding to 4 text-like tokens
    weights = {
        "image_proj.proj.weight": _randn((cross_dim * tokens, image_embed_dim), generator),
        "image_proj.proj.bias": torch.zeros(cross_dim * tokens),
        "image_proj.norm.weight": torch.ones(cross_dim),
        "image_proj.norm.bias": torch.zeros(cross_dim),
    }
    cross_attention = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, name in enumerate(cross_attention):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            key = f"ip_adapter.{2 * i + 1}.{projection}.weight"
            weights[key] = _randn((hidden, cross_dim), generator)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, out_dir / IP_ADAPTER_WEIGHTS)
    build_clip_vision(out_dir / "image_encoder", projection_dim=image_embed_dim, seed=seed)
    return out_dir


def build_clip_vision(
    out_dir: str | Path, *, projection_dim: int = 32, seed: int = 0, processor: bool = False
) -> Path:
    """Write a tiny random `CLIPVisionModelWithProjection` (32 px input, 2 layers) into `out_dir`,
    with its `CLIPImageProcessor` at that size when `processor`; return it. An IP-Adapter's image
    encoder, or the CLIP model of `warp_error.py --clip`."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    out_dir = Path(out_dir)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPVisionModelWithProjection(vision).save_pretrained(out_dir)
    if processor:
        size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        CLIPImageProcessor(**size).save_pretrained(out_dir)
    return out_dir


def _meta_unet(model_path: str | Path):
    """Return the model's UNet built on the meta device: its layers and shapes, no weights."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(model_path, subfolder="unet")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _randn(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Return a linear weight with unit-variance outputs for unit-variance inputs."""
    return torch.randn(shape, generator=generator) / shape[1] ** 0.5


# --- single-file checkpoint -----------------------------------------------------------------

_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def save_single_file(model_path: str | Path, out_file: str | Path) -> Path:
    """Write an SD1.5 or SD 2.x folder as one original-layout `.safetensors` checkpoint.

    Keys as the original Stable Diffusion checkpoints have them (`model.diffusion_model.*`,
    `first_stage_model.*`, and `cond_stage_model.transformer.*` for SD 1.x's CLIP or
    `cond_stage_model.model.*` for SD 2.x's OpenCLIP), so
    `StableDiffusionPipeline.from_single_file(out_file, config=model_path)` loads it offline.
    """
    from stylekit.engine.models import family_of_unet

    model_path, out_file = Path(model_path), Path(out_file)
    unet_config = json.loads((model_path / "unet" / "config.json").read_text())
    vae_config = json.loads((model_path / "vae" / "config.json").read_text())
    if unet_config.get("addition_embed_type") is not None:
        raise ValueError(
            "save_single_file writes the SD1.5 layout (or SD 2.x's); this is SDXL-like"
        )
    text = {
        k.removeprefix("text_model."): v
        for k, v in _folder_weights(model_path / "text_encoder").items()
    }
    if family_of_unet(unet_config) == "sd2":
        text_part = ("cond_stage_model.model.", _open_clip_layout(text))
    else:
        text_part = (
            "cond_stage_model.transformer.",
            {f"text_model.{k}": v for k, v in text.items()},
        )
    parts = {
        "model.diffusion_model.": _rename(
            _folder_weights(model_path / "unet"), _unet_prefixes(unet_config), _UNET_RESNET_NAMES
        ),
        "first_stage_model.": _vae_to_ldm(_folder_weights(model_path / "vae"), vae_config),
        text_part[0]: text_part[1],
    }
    checkpoint = {prefix + k: v for prefix, part in parts.items() for k, v in part.items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, out_file)
    return out_file


_OPEN_CLIP_NAMES = {  # CLIPTextModel (text_model. stripped) -> OpenCLIP, as SD 2.x checkpoints
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _open_clip_layout(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a CLIPTextModel state dict to OpenCLIP's: q, k, v fused into `attn.in_proj_*`."""
    out = {}
    for key, value in text.items():
        if key in _OPEN_CLIP_NAMES:
            out[_OPEN_CLIP_NAMES[key]] = value
            continue
        if not key.startswith("encoder.layers."):
            raise ValueError(f"no OpenCLIP name for text encoder weight {key!r}")
        layer, _, leaf = key.removeprefix("encoder.layers.").partition(".")
        module, _, param = leaf.rpartition(".")
        block = f"transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module.endswith("q_proj"):  # in_proj is [q; k; v] along the output dimension
                parts = [text[f"encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                out[f"{block}attn.in_proj_{param}"] = torch.cat(parts)
            continue
        out[block + f"{_OPEN_CLIP_LAYER_NAMES[module]}.{param}"] = value
    return out


def _folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    return {k: v for file in files for k, v in load_file(file).items()}


def _rename(
    weights: dict[str, torch.Tensor], prefixes: dict[str, str], resnet_names: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Move each key to its original prefix; rename the leaf module inside resnets."""
    renamed = {}
    for key, value in weights.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"no original-layout name for {key!r}")
        leaf = key[len(prefix) :]
        if ".resnets." in prefix:
            module, _, param = leaf.rpartition(".")
            leaf = f"{resnet_names.get(module, module)}.{param}"
        renamed[prefixes[prefix] + leaf] = value
    return renamed


def _unet_prefixes(config: dict) -> dict[str, str]:
    """Map diffusers UNet module prefixes to LDM's input/middle/output block slots."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block must be one int for this layout, got {layers!r}")
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    slot = 1  # input_blocks.0 is conv_in; each resnet(+attention) or downsampler takes one slot
    n_down = len(config["down_block_types"])
    for b in range(n_down):
        for j in range(layers):
            prefixes[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{slot}.0."
            prefixes[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{slot}.1."
            slot += 1
        if b < n_down - 1:
            prefixes[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{slot}.0.op."
            slot += 1
    slot = 0  # up blocks have one layer more; the upsampler follows the last one's attention
    for b, block_type in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            prefixes[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{slot}.0."
            prefixes[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{slot}.1."
            slot += 1
        after = 2 if block_type.startswith("CrossAttn") else 1
        prefixes[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{slot - 1}.{after}.conv."
    return prefixes


def _vae_to_ldm(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename an `AutoencoderKL` state dict to LDM's; attention projections become 1x1 convs."""
    n = len(config["down_block_types"])
    prefixes = {
        "quant_conv.": "quant_conv.",
        "post_quant_conv.": "post_quant_conv.",
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in."] = f"{part}.conv_in."
        prefixes[f"{part}.conv_out."] = f"{part}.conv_out."
        prefixes[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
    for i in range(n):
        up = n - 1 - i  # LDM numbers decoder levels from the lowest resolution up
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (
            f"encoder.down.{i}.downsample.conv."
        )
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
        for j in range(config["layers_per_block"] + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
    attention = {k: v for k, v in weights.items() if ".mid_block.attentions.0." in k}
    renamed = _rename(
        {k: v for k, v in weights.items() if k not in attention}, prefixes, _VAE_RESNET_NAMES
    )
    for key, value in attention.items():
        part, leaf = key.split(".mid_block.attentions.0.")
        module, _, param = leaf.rpartition(".")
        if value.ndim == 2:
            value = value[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        renamed[f"{part}.mid.attn_1.{_VAE_ATTENTION_NAMES[module]}.{param}"] = value
    return renamed


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_motion_adapter(
    path: str | Path,
    *,
    family: Literal["sd15", "sdxl"] = "sd15",
    size: Literal["tiny", "full"] = "tiny",
    seed: int = 0,
    zero_out: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write an AnimateDiff `MotionAdapter` folder matching the tiny (or full) UNet of `family`.

    A fresh adapter's temporal transformers end in `proj_out` layers with small random weights;
    here they are filled with seeded noise of the default scale so that frames visibly mix (a test
    against the per-frame UNet then checks something), or zeroed (`zero_out`): then the motion
    UNet must equal the per-frame UNet, a structural check.
    """
    from diffusers import MotionAdapter

    if size == "full":  # diffusers' defaults are AnimateDiff's SD1.5 adapter (v1-5-2 layout)
        config = {} if family == "sd15" else {"block_out_channels": (320, 640, 1280)}
    else:
        config = {
            "block_out_channels": (32, 64),
            "motion_layers_per_block": 1 if family == "sd15" else 2,
            "motion_num_attention_heads": 2,
            "motion_max_seq_length": 32,
        }
    if family == "sdxl":
        config["use_motion_mid_block"] = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = MotionAdapter(**config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if ".proj_out." in name:
                fill = torch.zeros_like(param) if zero_out else _proj_noise(param, generator)
                param.copy_(fill)
    adapter.to(dtype).save_pretrained(Path(path))
    return Path(path)


def _proj_noise(param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform ±1/√fan_in (PyTorch's linear default) for weights, small noise for biases."""
    if param.ndim >= 2:
        bound = param[0].numel() ** -0.5
        return (torch.rand(param.shape, generator=generator) * 2 - 1) * bound
    return torch.randn(param.shape, generator=generator) * 0.01


# --- ControlNet and depth estimation --------------------------------------------------------

CONTROLNET_ZERO_LAYERS = ("controlnet_down_blocks", "controlnet_mid_block", "conv_out")


@torch.no_grad()
def build_controlnet(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    std: float = 0.3,
    embedding_channels: tuple[int, ...] = (8, 8, 8, 8),
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random `ControlNetModel` for the UNet at `model_path` into `out_dir`; return it.

    `ControlNetModel.from_unet` copies the UNet's config and encoder, but its zero convolutions
    (`controlnet_down_blocks`, `controlnet_mid_block` and the conditioning embedding's
    `conv_out`) start at exactly zero: such a net changes nothing and every test passes
    whatever the code does. They are filled with seeded noise of `std` here.
    `embedding_channels` are the conditioning embedding's (SD1.5's nets: 16, 32, 96, 256).
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", dtype=dtype)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels)
    net.to(dtype)
    del unet
    generator = torch.Generator().manual_seed(seed)
    for name, param in net.named_parameters():
        zero = name.startswith(CONTROLNET_ZERO_LAYERS[:2]) or ".conv_out." in name
        if zero:
            param.copy_(torch.randn(param.shape, generator=generator) * std)  # cast to dtype
    net.save_pretrained(out_dir)
    return Path(out_dir)


def build_depth_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random `DepthAnythingForDepthEstimation` with its `DPTImageProcessor` into
    `out_dir`: it loads through `pipeline("depth-estimation", model=out_dir)` as a real one does."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[16, 16, 16, 16],
        reassemble_hidden_size=32,
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        DepthAnythingForDepthEstimation(config).save_pretrained(out_dir)
    DPTImageProcessor(
        do_resize=True,
        size={"height": 56, "width": 56},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out_dir)
    return Path(out_dir)


def build_dinov2(path: str | Path, *, seed: int = 0, image_size: int = 28) -> Path:
    """Write a tiny random `Dinov2Model` folder (hidden 32, 4 layers, 2 heads, patch 7) for the
    discriminator features of `stylekit distill` (the real one is facebook/dinov2-small)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=7,
        image_size=image_size,
    )
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Dinov2Model(config).eval().save_pretrained(path)
    return path
