"""The model loader's decisions: family, accelerator, LoRA specs, dtype, sources, style block."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from stylekit.engine import models
from stylekit.engine.models import (
    LCM_LORA,
    LoraSpec,
    ModelSpec,
    accelerator_source,
    check_source,
    detect_family,
    resolve_dtype,
)
from stylekit.engine.style import ip_adapter_layers, set_style_scale, style_block
from stylekit.errors import ModelError, UsageError

CPU = torch.device("cpu")

# Configs of the real UNets: stabilityai/stable-diffusion-xl-base-1.0 and SD1.5 (diffusers'
# defaults with 768-wide cross-attention), built on the meta device: layers, no weights.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def tiny_spec(path: Path, **kwargs) -> ModelSpec:
    return ModelSpec(str(path), accelerator="none", device="cpu", dtype="fp32", **kwargs)


# --- family ----------------------------------------------------------------------------------


def test_detect_family_of_folders(sd15_path, sd2_path, sdxl_path):
    assert detect_family(str(sd15_path)) == "sd15"
    assert detect_family(str(sd2_path)) == "sd2"
    assert detect_family(str(sdxl_path)) == "sdxl"


# The UNet configs' deciding keys as the hub repos publish them (unet/config.json):
# stable-diffusion-v1-5 (768, 1x1-conv projections), stable-diffusion-2-1 and -2-1-base and
# sd-turbo (1024, linear projections, per-level heads), stable-diffusion-xl-base-1.0 and
# sdxl-turbo (text_time, 2048).
REAL_UNETS = [
    ({"cross_attention_dim": 768, "attention_head_dim": 8}, "sd15"),
    (
        {
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        "sd2",
    ),
    (
        {
            "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
        },
        "sdxl",
    ),
    # the width decides over structure on real widths (an SD 1.x conversion with linear layers)
    ({"cross_attention_dim": 768, "use_linear_projection": True}, "sd15"),
    ({"cross_attention_dim": 1024}, "sd2"),
]


@pytest.mark.parametrize(("config", "family"), REAL_UNETS)
def test_family_of_real_unet_configs(config, family):
    assert models.family_of_unet(config) == family


def test_family_of_tiny_unet_configs(sd15_path, sd2_path, sdxl_path):
    """Tiny widths (32, 64) fall back to structure: linear projections are SD 2.x."""
    for path, family in [(sd15_path, "sd15"), (sd2_path, "sd2"), (sdxl_path, "sdxl")]:
        config = UNet2DConditionModel.load_config(path, subfolder="unet")
        assert config["cross_attention_dim"] not in (768, 1024, 2048)
        assert models.family_of_unet(config) == family


def test_detect_family_of_hub_ids_reads_the_unet_config(monkeypatch):
    """A hub id: model_index.json, then (SD 1.x/2.x only) unet/config.json, both from the hub."""
    from diffusers import DiffusionPipeline

    configs = {  # the deciding keys of the hub repos' configs
        "stable-diffusion-v1-5/stable-diffusion-v1-5": ("StableDiffusionPipeline", 768, False),
        "stabilityai/stable-diffusion-2-1": ("StableDiffusionPipeline", 1024, True),
        "stabilityai/sd-turbo": ("StableDiffusionPipeline", 1024, True),
        "stabilityai/sdxl-turbo": ("StableDiffusionXLPipeline", 2048, True),
    }
    asked = []

    def index(source, **kwargs):
        return {"_class_name": configs[source][0]}

    def unet(source, subfolder=None, **kwargs):
        asked.append(source)
        _, width, linear = configs[source]
        return {"cross_attention_dim": width, "use_linear_projection": linear}

    monkeypatch.setattr(DiffusionPipeline, "load_config", index)
    monkeypatch.setattr(UNet2DConditionModel, "load_config", unet)
    families = [detect_family(source) for source in configs]
    assert families == ["sd15", "sd2", "sd2", "sdxl"]
    assert asked == list(configs)[:3]  # SDXL is known from model_index.json alone


def test_detect_family_of_sd2_single_files(sd2_single_file, tmp_path):
    assert detect_family(str(sd2_single_file)) == "sd2"
    unet = "model.diffusion_model.input_blocks.1.1."
    cases = {  # one deciding tensor each, at the real models' shapes
        "sd2-width": ({f"{unet}transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "sd2"),
        "sd15-width": ({f"{unet}transformer_blocks.0.attn2.to_k.weight": (320, 768)}, "sd15"),
        "linear": ({f"{unet}proj_in.weight": (320, 320)}, "sd2"),
        "conv": ({f"{unet}proj_in.weight": (320, 320, 1, 1)}, "sd15"),
        "open-clip": ({"cond_stage_model.model.token_embedding.weight": (49408, 1024)}, "sd2"),
        "clip": (
            {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
            "sd15",
        ),
    }
    for name, (shapes, family) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, path)
        assert detect_family(str(path)) == family, name
        pickled = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": {k: torch.zeros(shape) for k, shape in shapes.items()}}, pickled)
        assert detect_family(str(pickled), allow_pickle=True) == family, name


def test_detect_family_of_single_files(sd15_single_file, tmp_path):
    assert detect_family(str(sd15_single_file)) == "sd15"
    xl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(2)}, xl)
    assert detect_family(str(xl)) == "sdxl"


def test_detect_family_of_pickled_checkpoints(sd15_single_file, tmp_path):
    from safetensors.torch import load_file

    sd15 = tmp_path / "sd15.ckpt"
    torch.save({"state_dict": load_file(sd15_single_file)}, sd15)  # as SD 1.x .ckpt files
    assert detect_family(str(sd15), allow_pickle=True) == "sd15"
    xl = tmp_path / "xl.pt"
    torch.save({"conditioner.embedders.1.model.ln_final.weight": torch.ones(2)}, xl)  # no wrapper
    assert detect_family(str(xl), allow_pickle=True) == "sdxl"
    with pytest.raises(UsageError, match="--allow-pickle"):
        detect_family(str(sd15))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ModelError, match="not a readable pickled checkpoint"):
        detect_family(str(garbage), allow_pickle=True)


def test_detect_family_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        detect_family(str(tmp_path / "folder"))
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.ones(2)}, other)
    with pytest.raises(ModelError, match="not a Stable Diffusion or SDXL checkpoint"):
        detect_family(str(other))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        detect_family(str(garbage))


# --- accelerator -----------------------------------------------------------------------------


# STD's published image LoRAs, copied from shared/specs/sampling.md (hub repo
# `SecondComming/Single-Trajectory-Distillation`, files `std_sdxl_i2i_eta{0.65,0.75,0.85,0.95}`),
# spelled out rather than built by the loader's own f-string.
STD_I2I_FILES = [
    "SecondComming/Single-Trajectory-Distillation/std_sdxl_i2i_eta0.65.safetensors",
    "SecondComming/Single-Trajectory-Distillation/std_sdxl_i2i_eta0.75.safetensors",
    "SecondComming/Single-Trajectory-Distillation/std_sdxl_i2i_eta0.85.safetensors",
    "SecondComming/Single-Trajectory-Distillation/std_sdxl_i2i_eta0.95.safetensors",
]


@pytest.mark.parametrize(
    ("strength", "expected"),
    [
        (0.3, STD_I2I_FILES[0]),
        (0.65, STD_I2I_FILES[0]),
        (0.72, STD_I2I_FILES[1]),
        (0.75, STD_I2I_FILES[1]),
        (0.85, STD_I2I_FILES[2]),
        (0.88, STD_I2I_FILES[2]),
        (0.95, STD_I2I_FILES[3]),
        (1.0, STD_I2I_FILES[3]),
    ],
)
def test_sdxl_accelerator_is_std_lora_for_the_strength(strength, expected):
    spec = ModelSpec("stabilityai/stable-diffusion-xl-base-1.0", strength=strength)
    assert accelerator_source(spec, "sdxl", turbo=False) == expected


def test_sdxl_accelerator_only_names_published_std_files():
    picked = {
        accelerator_source(ModelSpec("x/y", strength=i / 100), "sdxl", turbo=False)
        for i in range(1, 101)
    }
    assert picked == set(STD_I2I_FILES)


def test_accelerator_for_sd15_turbo_none_and_explicit():
    sd15 = ModelSpec("stable-diffusion-v1-5/stable-diffusion-v1-5", scheduler="lcm")
    assert accelerator_source(sd15, "sd15", turbo=False) == LCM_LORA["sd15"]
    for name, family in [("stabilityai/sd-turbo", "sd2"), ("stabilityai/sdxl-turbo", "sdxl")]:
        assert models.is_turbo(name)
        assert accelerator_source(ModelSpec(name), family, turbo=True) is None
    none = ModelSpec("stabilityai/stable-diffusion-xl-base-1.0", accelerator="none")
    assert accelerator_source(none, "sdxl", turbo=False) is None
    own = ModelSpec("x/y", accelerator="me/my-lora/fast.safetensors")
    assert accelerator_source(own, "sd15", turbo=False) == "me/my-lora/fast.safetensors"
    assert accelerator_source(own, "sd15", turbo=True) == "me/my-lora/fast.safetensors"


@pytest.mark.parametrize("task", models.TASKS)
@pytest.mark.parametrize("scheduler", ["tcd", "lcm"])
def test_sd2_gets_no_accelerator_and_no_default_ip_adapter(task, scheduler):
    sd2 = ModelSpec("stabilityai/stable-diffusion-2-1", task=task, scheduler=scheduler)
    choice = models.choose_accelerator(sd2, "sd2", turbo=False)
    assert choice.source is None and choice.notice is None
    assert "SD 2.x" in choice.warning and "--accelerator" in choice.warning
    assert "\n" not in choice.warning
    turbo = models.choose_accelerator(sd2, "sd2", turbo=True)  # SD-Turbo needs none
    assert turbo.source is None and turbo.warning is None
    none = models.choose_accelerator(replace(sd2, accelerator="none"), "sd2", turbo=False)
    assert none == models.Accelerator(None)
    own = replace(sd2, accelerator="me/sd2-lcm/lora.safetensors")
    assert accelerator_source(own, "sd2", turbo=False) == "me/sd2-lcm/lora.safetensors"
    with pytest.raises(UsageError, match="--style-mode ad"):
        models.check_family(replace(sd2, ip_adapter="auto"), "sd2")
    models.check_family(replace(sd2, ip_adapter="me/sd2-adapter/ip.safetensors"), "sd2")
    for family in ("sd15", "sdxl"):
        models.check_family(replace(sd2, ip_adapter="auto"), family)


# --- turbo -----------------------------------------------------------------------------------

TURBO_NAMES = [
    # source, turbo, notice
    ("stabilityai/sd-turbo", True, False),
    ("stabilityai/sdxl-turbo", True, False),
    ("StabilityAI/SDXL-Turbo", True, False),
    ("stabilityai/sdxl-turbo/sd_xl_turbo_1.0_fp16.safetensors", True, False),
    ("/root/.cache/huggingface/hub/models--stabilityai--sd-turbo/snapshots/1a2b3c", True, False),
    ("~/.cache/huggingface/hub/models--stabilityai--sdxl-turbo/snapshots/9f", True, False),
    ("/models/stabilityai/sdxl-turbo", True, False),
    ("/models/sd_xl_turbo_1.0.safetensors", True, False),
    ("/models/sd_turbo.safetensors", True, False),
    ("Lykon/dreamshaper-xl-turbo", False, True),
    ("/models/dreamshaper-xl-turbo", False, True),
    ("/models/dreamshaperXL_turboDPMSDE.safetensors", False, True),
    (
        "/root/.cache/huggingface/hub/models--Lykon--dreamshaper-xl-v2-turbo/snapshots/4d",
        False,
        True,
    ),
    ("someone/sd-turbo", False, True),
    ("stabilityai/stable-diffusion-xl-base-1.0", False, False),
    ("/models/sd15", False, False),
]


@pytest.mark.parametrize(("source", "turbo", "notice"), TURBO_NAMES)
def test_turbo_detection_table(source, turbo, notice):
    assert models.is_turbo(source) == turbo
    found, line = models.detect_turbo(source)
    assert found == turbo
    assert (line is not None) == notice
    if notice:
        assert source in line and "--turbo" in line and "\n" not in line
    for flag in (True, False):  # --turbo / --no-turbo decide, silently
        assert models.detect_turbo(source, flag) == (flag, None)


# --- LoRA specs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "source", "scale"),
    [
        ("a.safetensors:0.5", "a.safetensors", 0.5),
        ("a.safetensors", "a.safetensors", 1.0),
        ("a.safetensors:-1", "a.safetensors", -1.0),
        ("a.safetensors:.25", "a.safetensors", 0.25),
        ("a.safetensors:2.", "a.safetensors", 2.0),
        ("owner/repo/file.safetensors", "owner/repo/file.safetensors", 1.0),
        ("owner/repo/sub/file.safetensors:0.8", "owner/repo/sub/file.safetensors", 0.8),
        ("C:/loras/x.safetensors", "C:/loras/x.safetensors", 1.0),  # a drive letter, no scale
    ],
)
def test_lora_spec_parse(text, source, scale):
    assert LoraSpec.parse(text) == LoraSpec(source, scale)


def test_a_lora_scale_that_is_not_a_number_is_named(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match=r"the scale 'high' is not a number"):
        LoraSpec.parse("x.safetensors:high")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd:name.safetensors").write_bytes(b"")  # a file that exists is taken as given
    assert LoraSpec.parse("odd:name.safetensors") == LoraSpec("odd:name.safetensors", 1.0)


def test_lora_spec_parse_keeps_an_existing_path_with_a_colon(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "style:2").mkdir()
    assert LoraSpec.parse("style:2") == LoraSpec("style:2", 1.0)
    assert LoraSpec.parse("style:2:0.5") == LoraSpec("style:2", 0.5)


# --- dtype and device ------------------------------------------------------------------------


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", CPU) == torch.float32
    for name, dtype in [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        assert resolve_dtype(name, CPU) == dtype
        assert resolve_dtype(name, torch.device("cuda")) == dtype  # explicit beats the device
    with pytest.raises(UsageError, match="unknown dtype 'float8'; choose auto, fp32"):
        resolve_dtype("float8", CPU)


def test_resolve_device():
    assert models.resolve_device("cpu") == CPU
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        models.resolve_device("tpu")


# --- sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_check_source_refuses_pickle_unless_allowed(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"pickle")
    with pytest.raises(UsageError, match="--allow-pickle") as info:
        check_source(str(path), what="model", allow_pickle=False)
    assert str(path) in str(info.value)
    check_source(str(path), what="model", allow_pickle=True)


def test_check_source_refuses_missing_local_paths(tmp_path):
    missing = [tmp_path / "nope", tmp_path / "nope.safetensors", "./nope", "~/nope-stylekit"]
    for source in [*map(str, missing), "nope.safetensors", "loras/nope.safetensors"]:
        with pytest.raises(ModelError, match="no such file or folder") as info:
            check_source(source, what="LoRA", allow_pickle=False)
        assert str(info.value).startswith(f"LoRA {source}:")


def test_check_source_refuses_what_is_neither_path_nor_hub_id():
    for bad in ["just-a-name", "owner/repo name", "a b/c"]:
        with pytest.raises(ModelError, match="not a local path or a hub id"):
            check_source(bad, what="model", allow_pickle=False)


@pytest.mark.parametrize(
    "source",
    [
        "stabilityai/stable-diffusion-xl-base-1.0",
        "latent-consistency/lcm-lora-sdv1-5",
        "owner/repo/file.safetensors",
        STD_I2I_FILES[1],  # the SDXL accelerator `auto` picks at the default strength
        "h94/IP-Adapter/models/ip-adapter_sd15.safetensors",  # `--ip-adapter owner/repo/file`
    ],
)
def test_check_source_accepts_hub_ids_and_hub_files(source):
    check_source(source, what="LoRA", allow_pickle=False)


def test_check_source_accepts_existing_paths(sd15_path, sd15_lora, sd15_single_file):
    for path in (sd15_path, sd15_lora, sd15_single_file):
        check_source(str(path), what="model", allow_pickle=False)


def test_hub_lora_file_fails_offline_naming_it(sd15_path):
    """A LoRA named as owner/repo/file goes to the hub (offline here), not to the disk."""
    spec = tiny_spec(sd15_path, loras=(LoraSpec("nobody/no-lora/x.safetensors"),))
    with pytest.raises(ModelError, match="could not load") as info:
        models.load(spec)
    assert "LoRA nobody/no-lora/x.safetensors" in str(info.value)


# --- style block -----------------------------------------------------------------------------


def test_style_block_on_full_size_unets():
    assert style_block(meta_unet(SDXL_UNET)) == "up_blocks.0.attentions.1"
    assert style_block(meta_unet(SD15_UNET)) == "up_blocks.1"


def cross_attention_layers(unet, block: str) -> list[str]:
    """The cross-attention processors (where IP-Adapter attaches) inside `block`."""
    return sorted(n for n in unet.attn_processors if n.startswith(block + ".") and ".attn2." in n)


def test_style_block_layers_on_full_size_unets():
    """InstantStyle's targets: SDXL's 10 transformer layers of `up_blocks.0.attentions.1` (its
    SDXL map), all 3 attentions of SD1.5's `up_blocks.1` (its SD1.5 code's `target_blocks`)."""
    sdxl, sd15 = meta_unet(SDXL_UNET), meta_unet(SD15_UNET)
    xl = cross_attention_layers(sdxl, style_block(sdxl))
    assert len(xl) == 10
    assert all(n.startswith("up_blocks.0.attentions.1.transformer_blocks.") for n in xl)
    assert cross_attention_layers(sd15, style_block(sd15)) == [
        f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2.processor" for i in range(3)
    ]


def test_style_block_on_tiny_fixtures(sd15_path, sdxl_path):
    for path, block in [
        (sd15_path, "up_blocks.1"),
        (sdxl_path, "up_blocks.0.attentions.1"),
    ]:
        config = UNet2DConditionModel.load_config(path, subfolder="unet")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        assert style_block(unet) == block


def test_style_block_needs_an_attention_up_block():
    config = {
        **SD15_UNET,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "mid_block_type": None,
    }
    with pytest.raises(ModelError, match="no up block with attention"):
        style_block(meta_unet(config))


@pytest.fixture(scope="module")
def sd15_with_adapter(sd15_path, sd15_ip_adapter):
    return models.load(tiny_spec(sd15_path, ip_adapter=str(sd15_ip_adapter)))


@pytest.fixture(scope="module")
def sdxl_with_adapter(sdxl_path, sdxl_ip_adapter):
    return models.load(tiny_spec(sdxl_path, ip_adapter=str(sdxl_ip_adapter)))


@pytest.mark.parametrize(
    ("which", "block", "attentions"),
    [  # the tiny SD1.5's up block 1 has 2 attentions: both take the scale, as InstantStyle's SD1.5
        (
            "sd15_with_adapter",
            "up_blocks.1",
            ["up_blocks.1.attentions.0", "up_blocks.1.attentions.1"],
        ),
        ("sdxl_with_adapter", "up_blocks.0.attentions.1", ["up_blocks.0.attentions.1"]),
    ],
)
def test_set_style_scale_only_on_the_style_block(request, which, block, attentions):
    model = request.getfixturevalue(which)
    assert model.pipe.image_encoder is not None and model.unet.encoder_hid_proj is not None
    unet = model.unet
    layers = ip_adapter_layers(unet)
    active = set_style_scale(unet, 0.7)
    assert active and all(name.startswith(block + ".") for name in active)
    for name, proc in layers.items():
        expected = 0.7 if name.startswith(block + ".") else 0.0
        assert proc.scale == [expected] * len(proc.scale), name
    assert sorted(active) == sorted(n for n in layers if n.startswith(block + "."))
    assert sorted({n.split(".transformer_blocks")[0] for n in active}) == attentions
    assert len(active) < len(layers)

    everywhere = set_style_scale(unet, 0.3, block="")
    assert sorted(everywhere) == sorted(layers)
    assert all(proc.scale == [0.3] * len(proc.scale) for proc in layers.values())


def test_set_style_scale_refuses_a_block_without_ip_layers(sd15_with_adapter):
    with pytest.raises(ModelError, match="'down_blocks.1' has no IP-Adapter layer"):
        set_style_scale(sd15_with_adapter.unet, 1.0, block="down_blocks.1")
    with pytest.raises(ModelError, match="has no IP-Adapter layer"):
        set_style_scale(sd15_with_adapter.unet, 1.0, block="up_blocks.0")


def test_set_style_scale_needs_an_adapter(sd15_path):
    model = models.load(tiny_spec(sd15_path))
    with pytest.raises(ModelError, match="no IP-Adapter is loaded"):
        set_style_scale(model.unet, 1.0)


# --- loading ---------------------------------------------------------------------------------


def test_load_local_tiny_vae_path(sd15_path, tiny_vae_path):
    from diffusers import AutoencoderTiny

    model = models.load(tiny_spec(sd15_path, tiny_vae=str(tiny_vae_path)))
    assert isinstance(model.vae, AutoencoderTiny)
    assert model.family == "sd15" and model.dtype == torch.float32 and not model.turbo


def test_load_sd2_with_tiny_vae(sd2_path, tiny_vae_path):
    """SD 2.x loads as itself: auto accelerator picks nothing and says so; TAESD fits it."""
    from diffusers import AutoencoderTiny

    spec = replace(tiny_spec(sd2_path, tiny_vae=str(tiny_vae_path)), accelerator="auto")
    model = models.load(spec)
    assert model.family == "sd2" and not model.turbo and model.accelerator is None
    assert isinstance(model.vae, AutoencoderTiny)
    assert len(model.warnings) == 1 and "SD 2.x" in model.warnings[0]
    assert model.unet.config.cross_attention_dim == 64
    assert model.pipe.text_encoder.config.hidden_size == 64


def test_load_sd2_refuses_the_default_ip_adapter_before_loading(sd2_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(models, "load_pipeline", no_load)
    with pytest.raises(UsageError, match="--style-mode ad"):
        models.load(tiny_spec(sd2_path, ip_adapter="auto"))


def test_load_sd2_single_file(sd2_single_file, sd2_path):
    model = models.load(tiny_spec(sd2_single_file, model_config=str(sd2_path)))
    assert model.family == "sd2" and model.notices == model.warnings == ()
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"


def test_sd2_single_file_without_config_says_what_diffusers_assumes(sd2_single_file, tmp_path):
    """The weights do not say ε or v: diffusers takes stable-diffusion-2-1's (v) config."""
    spec = tiny_spec(sd2_single_file)
    (notice,) = models.family_warnings(spec, "sd2")
    assert "v-prediction" in notice and "--model-config" in notice
    assert models.family_warnings(replace(spec, model_config="x/y"), "sd2") == []
    assert models.family_warnings(spec, "sd15") == []
    assert models.family_warnings(tiny_spec("stabilityai/stable-diffusion-2-1"), "sd2") == []
    turbo_file = tmp_path / "sd_turbo.safetensors"  # the released file loads with its repo's config
    turbo_file.symlink_to(sd2_single_file)
    assert models.single_file_config(tiny_spec(turbo_file)) == "stabilityai/sd-turbo"
    assert models.family_warnings(tiny_spec(turbo_file), "sd2") == []
    xl = ModelSpec("/models/SD_XL_TURBO_1.0_fp16.safetensors")
    assert models.single_file_config(xl) == "stabilityai/sdxl-turbo"
    assert models.single_file_config(replace(xl, model_config="me/cfg")) == "me/cfg"
    assert models.single_file_config(spec) is None


def test_turbo_flag_and_name_notice_when_loading(sd15_path, tmp_path):
    """A folder that merely has "turbo" in its name keeps the accelerator path and gets a notice;
    --turbo makes it turbo, silently."""
    folder = tmp_path / "dreamshaper-turbo"
    folder.symlink_to(sd15_path, target_is_directory=True)
    plain = models.load(tiny_spec(folder))
    assert not plain.turbo
    (notice,) = plain.warnings
    assert "looks like a turbo model" in notice and "--turbo" in notice
    turbo = models.load(tiny_spec(folder, turbo=True))
    assert turbo.turbo and turbo.warnings == ()
    not_turbo = models.load(tiny_spec(folder, turbo=False))
    assert not not_turbo.turbo and not_turbo.warnings == ()
    # auto still wants SD1.5's few-step LoRA for the look-alike (offline here: it fails naming it)
    with pytest.raises(ModelError, match="TCD-SD15-LoRA"):
        models.load(replace(tiny_spec(folder), accelerator="auto"))
    assert accelerator_source(replace(tiny_spec(folder), accelerator="auto"), "sd15", True) is None


def test_load_single_file(sd15_single_file, sd15_path):
    model = models.load(tiny_spec(sd15_single_file, model_config=str(sd15_path)))
    assert model.family == "sd15"
    assert model.unet.config.cross_attention_dim == 32
