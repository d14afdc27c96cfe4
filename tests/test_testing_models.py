"""The random-weight test models load through plain diffusers classes and run."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderTiny,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from stylekit.testing import build_sd15, save_single_file, write_tokenizer

STYLE_ONLY = {"up": {"block_0": [0.0, 1.0, 0.0]}}  # InstantStyle: only up_blocks.0.attentions.1


def image(seed: int, size: int = 64) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def load(pipeline_class, path):
    pipe = pipeline_class.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs) -> np.ndarray:
    """Run 2 steps at 64x64 (txt2img without `image`, img2img at strength 0.75 with it)."""
    size = {"strength": 0.75} if "image" in kwargs else {"height": 64, "width": 64}
    out = pipe(
        prompt="a photo of a cat in watercolor style",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **{**size, **kwargs},
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()
    return out


def unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {
            "text_embeds": torch.randn(1, 32),
            "time_ids": torch.tensor([[64.0] * 2 + [0.0] * 2 + [64.0] * 2]),
        }
    with torch.no_grad():
        return unet(latents, 500, text, added_cond_kwargs=added).sample


def test_tokenizer_loads_with_clip_length(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path))
    assert tokenizer.model_max_length == 77
    ids = tokenizer("A photo of a cat!", padding="max_length", truncation=True).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids[:7])
    assert tokens == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        "!</w>",
    ]
    assert len(ids) == 77 and ids[7:] == [tokenizer.eos_token_id] * 70
    assert tokenizer.eos_token_id == len(tokenizer) - 1


def test_sd15_runs_txt2img_and_img2img(sd15_path):
    index = json.loads((sd15_path / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    pipe = load(StableDiffusionPipeline, sd15_path)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.clip_sample is False
    run(pipe)
    run(load(StableDiffusionImg2ImgPipeline, sd15_path), image=image(0))


def test_builds_are_deterministic_from_seed(sd15_path, tmp_path):
    weights = "unet/diffusion_pytorch_model.safetensors"
    again = load_file(build_sd15(tmp_path / "again") / weights)
    other = load_file(build_sd15(tmp_path / "other", seed=1) / weights)
    first = load_file(sd15_path / weights)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv_in.weight"], other["conv_in.weight"])


def test_sd15_bf16_build(tmp_path):
    path = build_sd15(tmp_path / "bf16", dtype=torch.bfloat16)
    weights = load_file(path / "unet/diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}


def test_inpaint_model_runs(sd15_inpaint_path):
    pipe = load(StableDiffusionInpaintPipeline, sd15_inpaint_path)
    assert pipe.unet.config.in_channels == 9
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    run(pipe, image=image(0), mask_image=mask, strength=1.0, height=64, width=64)


def test_sdxl_runs_txt2img_and_img2img(sdxl_path):
    pipe = load(StableDiffusionXLPipeline, sdxl_path)
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.model_max_length == 77
    assert pipe.unet.get_submodule("up_blocks.0.attentions.1") is not None
    run(pipe)
    run(load(StableDiffusionXLImg2ImgPipeline, sdxl_path), image=image(0))


def test_tiny_vae_scale_factor_8(tiny_vae_path):
    vae = AutoencoderTiny.from_pretrained(tiny_vae_path)
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latents
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 8) and decoded.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lora_loads_and_changes_unet(kind, request):
    path, lora = request.getfixturevalue(f"{kind}_path"), request.getfixturevalue(f"{kind}_lora")
    pipeline_class = (
        StableDiffusionImg2ImgPipeline if kind == "sd15" else StableDiffusionXLImg2ImgPipeline
    )
    assert lora.suffix == ".safetensors"
    for source in (lora, lora.parent):  # a file or its folder, as users pass either
        pipe = load(pipeline_class, path)
        before = unet_output(pipe.unet)
        pipe.load_lora_weights(source)
        after = unet_output(pipe.unet)
        change = ((after - before).norm() / before.norm()).item()
        assert torch.isfinite(after).all() and 0.05 < change < 1.0
    run(pipe, image=image(0))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_ip_adapter_loads_and_changes_output(kind, request):
    path = request.getfixturevalue(f"{kind}_path")
    adapter = request.getfixturevalue(f"{kind}_ip_adapter")
    pipeline_class = (
        StableDiffusionImg2ImgPipeline if kind == "sd15" else StableDiffusionXLImg2ImgPipeline
    )
    pipe = load(pipeline_class, path)
    pipe.load_ip_adapter(
        adapter,
        subfolder="",
        weight_name="ip-adapter.safetensors",
        image_encoder_folder="image_encoder",
    )
    outputs = {}
    scales = (
        {"off": 0.0, "on": 1.0, "style": STYLE_ONLY} if kind == "sdxl" else {"off": 0.0, "on": 1.0}
    )
    for name, scale in scales.items():
        pipe.set_ip_adapter_scale(scale)
        outputs[name] = run(pipe, image=image(0), ip_adapter_image=image(1, size=80))
    assert np.abs(outputs["on"] - outputs["off"]).mean() > 1e-3
    if kind == "sdxl":
        assert np.abs(outputs["style"] - outputs["off"]).mean() > 1e-3
        assert np.abs(outputs["style"] - outputs["on"]).mean() > 1e-3


def test_ip_adapter_style_map_selects_one_layer(sdxl_path, sdxl_ip_adapter):
    pipe = load(StableDiffusionXLImg2ImgPipeline, sdxl_path)
    pipe.load_ip_adapter(sdxl_ip_adapter, subfolder="", weight_name="ip-adapter.safetensors")
    pipe.set_ip_adapter_scale(STYLE_ONLY)
    scales = {n: p.scale for n, p in pipe.unet.attn_processors.items() if hasattr(p, "scale")}
    on = {n for n, s in scales.items() if s == [1.0]}
    assert len(scales) > 2 and on and all(n.startswith("up_blocks.0.attentions.1.") for n in on)


def test_single_file_matches_folder(sd15_path, sd15_single_file):
    checkpoint = load_file(sd15_single_file)
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in checkpoint
    assert (
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in checkpoint
    )
    for name, convert in (
        ("unet", convert_ldm_unet_checkpoint),
        ("vae", convert_ldm_vae_checkpoint),
    ):
        config = json.loads((sd15_path / name / "config.json").read_text())
        folder = load_file(sd15_path / name / "diffusion_pytorch_model.safetensors")
        back = convert(checkpoint, config)
        assert back.keys() == folder.keys()
        assert all(torch.equal(back[k], folder[k]) for k in folder)
    single = StableDiffusionPipeline.from_single_file(sd15_single_file, config=str(sd15_path))
    single.set_progress_bar_config(disable=True)
    reference = load(StableDiffusionPipeline, sd15_path)
    # Same weights; parameter memory alignment differs, so float sums may differ by ~1e-6.
    torch.testing.assert_close(
        unet_output(single.unet), unet_output(reference.unet), atol=1e-5, rtol=0
    )
    run(single)


def test_sd2_single_file_matches_folder(sd2_path, sd2_single_file):
    """SD 2.x's checkpoint keeps its text encoder in OpenCLIP's layout (q, k, v fused), and
    diffusers' own converter gives back the folder's weights, text encoder included."""
    checkpoint = load_file(sd2_single_file)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in checkpoint
    assert not any(k.startswith("cond_stage_model.transformer.") for k in checkpoint)
    assert checkpoint["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear
    single = StableDiffusionPipeline.from_single_file(sd2_single_file, config=str(sd2_path))
    single.set_progress_bar_config(disable=True)
    reference = load(StableDiffusionPipeline, sd2_path)
    assert single.scheduler.config.prediction_type == "v_prediction"
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(single, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    run(single)


def test_sd2_differs_from_sd15_where_detection_looks(sd15_path, sd2_path):
    sd15 = load(StableDiffusionPipeline, sd15_path)
    sd2 = load(StableDiffusionPipeline, sd2_path)
    assert sd2.unet.config.use_linear_projection and not sd15.unet.config.use_linear_projection
    assert (sd2.unet.config.cross_attention_dim, sd15.unet.config.cross_attention_dim) == (64, 32)
    assert (
        sd2.text_encoder.config.hidden_size == 64 and sd2.text_encoder.config.hidden_act == "gelu"
    )
    assert sd2.tokenizer.pad_token == "!" and sd15.tokenizer.pad_token == "<|endoftext|>"
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    run(sd2)
    run(StableDiffusionImg2ImgPipeline(**sd2.components), image=image(1))


def test_single_file_refuses_sdxl(sdxl_path, tmp_path):
    with pytest.raises(ValueError, match="SD1.5 layout"):
        save_single_file(sdxl_path, tmp_path / "sdxl.safetensors")


def test_single_file_layout_of_full_size_sd15():
    """The key mapping holds for the real SD1.5 shapes (built on the meta device: no weights)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from stylekit import testing

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
    names = testing._UNET_RESNET_NAMES
    ldm_unet = testing._rename(unet.state_dict(), testing._unet_prefixes(unet.config), names)
    ldm_vae = testing._vae_to_ldm(vae.state_dict(), vae.config)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ldm_unet.items()}
    checkpoint |= {f"first_stage_model.{k}": v for k, v in ldm_vae.items()}
    assert infer_diffusers_model_type(checkpoint) == "v1"
    assert convert_ldm_unet_checkpoint(checkpoint, unet.config).keys() == unet.state_dict().keys()
    assert convert_ldm_vae_checkpoint(checkpoint, vae.config).keys() == vae.state_dict().keys()
