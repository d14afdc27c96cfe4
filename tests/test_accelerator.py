"""What `--accelerator auto` loads for each command, how η is picked, and which CLIP image encoder
each IP-Adapter gets: pure choice tables, then the choice reaching the loader through
`open_session` and through every command (no downloads: hub LoRAs are swapped for tiny ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit.engine import models
from stylekit.engine.models import (
    ETA_TOLERANCE,
    AdapterFiles,
    ModelSpec,
    adapter_files,
    choose_accelerator,
    image_encoder_folder,
    std_eta,
)
from stylekit.errors import UsageError
from stylekit.presets import Settings
from stylekit.runner import Events, Output

# The published names, spelled out (not built by the loader's f-strings): STD's image LoRAs
# (hub repo SecondComming/Single-Trajectory-Distillation), TCD-LoRA (h1t/TCD-SD15-LoRA and
# h1t/TCD-SDXL-LoRA, whose one weight file is diffusers' default name
# `pytorch_lora_weights.safetensors`, so the repo id loads it) and LCM-LoRA.
STD = "SecondComming/Single-Trajectory-Distillation/std_sdxl_i2i_eta{}.safetensors"
STD_065, STD_075, STD_085, STD_095 = (STD.format(e) for e in ("0.65", "0.75", "0.85", "0.95"))
TCD_SDXL, TCD_SD15 = "h1t/TCD-SDXL-LoRA", "h1t/TCD-SD15-LoRA"
LCM_SDXL, LCM_SD15 = "latent-consistency/lcm-lora-sdxl", "latent-consistency/lcm-lora-sdv1-5"


# --- η: nearest released one, ties to the higher, rounded before comparing ------------------

# (strength, η chosen, warned). 0.7, 0.8 and 0.9 lie exactly between two released η and go to
# the higher one; comparing raw float distances gave 0.65 for 0.7 but 0.85 for 0.8.
ETA_TABLE = [
    (0.3, 0.65, True),
    (0.6, 0.65, False),
    (0.65, 0.65, False),
    (0.7, 0.75, False),
    (0.75, 0.75, False),
    (0.8, 0.85, False),
    (0.85, 0.85, False),
    (0.9, 0.95, False),
    (0.95, 0.95, False),
    (1.0, 0.95, False),
    (0.59, 0.65, True),  # 0.06 away
    (0.696, 0.65, False),  # a hair below the tie: the nearest is 0.65
    (0.704, 0.75, False),
    (0.1 * 7, 0.75, False),  # 0.7000000000000001: still the tie
    (0.1 * 8, 0.85, False),  # 0.8000000000000002
]


@pytest.mark.parametrize(("strength", "eta", "warned"), ETA_TABLE)
def test_std_eta_table(strength, eta, warned):
    assert std_eta(strength) == eta
    spec = ModelSpec("x/y", strength=strength)
    choice = choose_accelerator(spec, "sdxl", turbo=False)
    assert choice.source == STD.format(f"{eta:.2f}")
    assert f"std_sdxl_i2i_eta{eta:.2f}.safetensors" in choice.notice
    assert f"strength {strength:g}" in choice.notice
    assert (choice.warning is not None) == warned
    if warned:
        assert f"strength {strength:g}" in choice.warning and f"η {eta:.2f}" in choice.warning


def test_eta_warning_names_the_gap_and_the_released_values():
    warning = choose_accelerator(ModelSpec("x/y", strength=0.3), "sdxl", turbo=False).warning
    assert warning.startswith("strength 0.3 is 0.35 from the nearest STD LoRA (η 0.65;")
    assert "0.65, 0.75, 0.85, 0.95" in warning
    assert ETA_TOLERANCE == 0.05


def test_every_strength_picks_a_published_file_and_only_far_ones_warn():
    for i in range(1, 101):
        strength = i / 100
        choice = choose_accelerator(ModelSpec("x/y", strength=strength), "sdxl", turbo=False)
        assert choice.source in (STD_065, STD_075, STD_085, STD_095)
        assert (choice.warning is not None) == (strength < 0.6), strength


# --- the accelerator per task, family and sampler -------------------------------------------

CHOICES = [  # family, task, scheduler, the LoRA `auto` loads
    ("sdxl", "img2img", "tcd", STD_075),
    ("sdxl", "img2img", "lcm", STD_075),
    ("sdxl", "video", "tcd", STD_075),  # the image LoRA per frame: v2v needs a motion module
    ("sdxl", "noise", "tcd", TCD_SDXL),  # from pure noise: off STD's single trajectory
    ("sdxl", "noise", "lcm", LCM_SDXL),
    ("sd15", "img2img", "lcm", LCM_SD15),  # no STD LoRA for SD1.5: the sampler's own LoRA
    ("sd15", "img2img", "tcd", TCD_SD15),
    ("sd15", "video", "lcm", LCM_SD15),
    ("sd15", "noise", "lcm", LCM_SD15),
    ("sd15", "noise", "tcd", TCD_SD15),
]


@pytest.mark.parametrize(("family", "task", "scheduler", "source"), CHOICES)
def test_auto_accelerator_per_task(family, task, scheduler, source):
    spec = ModelSpec("x/y", task=task, scheduler=scheduler, strength=0.75)
    choice = choose_accelerator(spec, family, turbo=False)
    assert choice.source == source
    assert source.split("/")[-1] in choice.notice and choice.warning is None


def test_notices_say_why():
    def notice(task, family="sdxl", scheduler="tcd"):
        spec = ModelSpec("x/y", task=task, scheduler=scheduler)
        return choose_accelerator(spec, family, turbo=False).notice

    assert "per frame" in notice("video") and "motion module" in notice("video")
    assert "pure noise" in notice("noise") and "TCD-LoRA" in notice("noise")
    assert "LCM-LoRA" in notice("noise", scheduler="lcm")
    assert "no STD LoRA for sd15" in notice("img2img", "sd15")


def test_strength_far_from_eta_only_warns_where_an_std_lora_is_used():
    for task, family in [("noise", "sdxl"), ("img2img", "sd15")]:
        spec = ModelSpec("x/y", task=task, strength=0.3)
        assert choose_accelerator(spec, family, turbo=False).warning is None
    video = choose_accelerator(ModelSpec("x/y", task="video", strength=0.3), "sdxl", turbo=False)
    assert video.warning is not None


@pytest.mark.parametrize("task", models.TASKS)
def test_turbo_none_and_explicit_whatever_the_task(task):
    turbo = choose_accelerator(ModelSpec("stabilityai/sdxl-turbo", task=task), "sdxl", turbo=True)
    assert turbo.source is None and "turbo" in turbo.notice
    for family in ("sd15", "sdxl"):
        none = choose_accelerator(ModelSpec("x/y", accelerator="none", task=task), family, False)
        assert none == models.Accelerator(None)
        own = ModelSpec("x/y", accelerator="me/fast/l.safetensors", task=task, strength=0.3)
        assert choose_accelerator(own, family, turbo=False) == models.Accelerator(
            "me/fast/l.safetensors"
        )  # the user's choice: no notice, no η warning


def test_unknown_task_is_refused():
    with pytest.raises(UsageError, match="unknown task 'txt2img'; choose one of img2img"):
        choose_accelerator(ModelSpec("x/y", task="txt2img"), "sdxl", turbo=False)


# --- the choice reaches the loader through open_session -------------------------------------


@pytest.fixture
def hub_loras(monkeypatch, sd15_lora, sdxl_lora):
    """Record the LoRA sources the loader asks for; load the tiny LoRA of the family instead."""
    asked: list[tuple[str, str]] = []
    real = models.load_lora

    def load_lora(pipe, source, *, name, allow_pickle, **kwargs):
        asked.append((name, source))
        tiny = sdxl_lora if "XL" in type(pipe).__name__ else sd15_lora
        real(pipe, str(tiny), name=name, allow_pickle=allow_pickle, **kwargs)

    monkeypatch.setattr(models, "load_lora", load_lora)
    return asked


def tiny_settings(model: Path, **values) -> Settings:
    base = dict(model=str(model), steps=2, cfg=1.0, style_mode="none")
    return Settings(**{**base, **values})


@pytest.mark.parametrize(
    ("task", "source"), [("img2img", STD_075), ("video", STD_075), ("noise", TCD_SDXL)]
)
def test_open_session_loads_the_tasks_accelerator(hub_loras, sdxl_path, task, source):
    from stylekit.session import Runtime, open_session

    session = open_session(
        tiny_settings(sdxl_path, strength=0.7), Runtime("cpu", "fp32"), task=task
    )
    assert hub_loras == [("accelerator", source)]
    assert session.model.accelerator == source
    assert session.metadata(seed=0, size=(64, 64))["accelerator"] == source
    assert len(session.model.notices) == 1 and source.split("/")[-1] in session.model.notices[0]
    assert session.model.warnings == ()


def test_open_session_on_sd15_follows_the_sampler(hub_loras, sd15_path):
    from stylekit.session import Runtime, open_session

    for scheduler, source in [("lcm", LCM_SD15), ("tcd", TCD_SD15)]:
        hub_loras.clear()
        settings = tiny_settings(sd15_path, scheduler=scheduler)
        open_session(settings, Runtime("cpu", "fp32"), task="img2img")
        assert hub_loras == [("accelerator", source)]


class Said(Events):
    def __init__(self):
        self.notices, self.warnings = [], []

    def notice(self, message):
        self.notices.append(message)

    def warning(self, message):
        self.warnings.append(message)


def test_lazy_session_announces_the_choice_and_the_eta_warning(hub_loras, sdxl_path):
    from stylekit.session import LazySession, Runtime

    events = Said()
    settings = tiny_settings(sdxl_path, strength=0.3)
    run = LazySession(settings, runtime=Runtime("cpu", "fp32"), seed=0, events=events)
    run.prepare()
    assert hub_loras == [("accelerator", STD_065)]
    assert events.notices == [
        "accelerator: STD std_sdxl_i2i_eta0.65.safetensors (η 0.65 for strength 0.3)"
    ]
    assert len(events.warnings) == 1 and events.warnings[0].startswith("strength 0.3 is 0.35")


def test_cli_prints_the_choice_and_quiet_hides_only_the_notice(hub_loras, sdxl_path, tmp_path):
    from stylekit.cli import app

    image = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
    args = ["stylize", str(image), "-o", str(tmp_path / "out"), "--model", str(sdxl_path)]
    args += ["--device", "cpu", "--dtype", "fp32", "--steps", "2", "--strength", "0.3"]
    args += ["--cfg", "1", "--style-mode", "none", "--seed", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "accelerator: STD std_sdxl_i2i_eta0.65.safetensors" in result.stderr
    assert "warning strength 0.3 is 0.35 from the nearest STD LoRA" in result.stderr
    quiet = CliRunner().invoke(app, [*args, "-q", "--overwrite"])
    assert quiet.exit_code == 0, (quiet.stderr, quiet.exception)
    assert "accelerator:" not in quiet.stderr and "warning strength 0.3" in quiet.stderr


# --- every command says what it is when it opens its session --------------------------------


class Stop(Exception):
    """Raised by the recording loader: the test needs the spec, not the model."""


@pytest.fixture
def specs(monkeypatch):
    """Record the ModelSpec each command asks the loader for, then stop the command."""
    seen: list[ModelSpec] = []

    def load(spec):
        seen.append(spec)
        raise Stop

    monkeypatch.setattr(models, "load", load)
    return seen


def write_png(path: Path) -> str:
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(path)
    return str(path)


def run_command(name: str, tmp_path: Path) -> None:
    from stylekit import api

    image = write_png(tmp_path / "in.png")
    settings = Settings(model="x/y", strength=0.8, scheduler="lcm")
    out = Output(out=tmp_path / "out")
    common = dict(settings=settings, output=out)
    if name == "stylize":
        api.stylize([image], **common)
    elif name == "inpaint":
        api.inpaint([image], mask=write_png(tmp_path / "mask.png"), **common)
    elif name == "t2i-styled":
        api.t2i_styled("a cat", **common)
    elif name == "texture-expand":
        api.texture_expand([image], size=(64, 64), **common)
    elif name == "texture":
        api.texture([image], **common)
    elif name == "video":
        (tmp_path / "clip.mp4").write_bytes(b"")  # read only after the model loads
        api.stylize_video([str(tmp_path / "clip.mp4")], **common)


@pytest.mark.parametrize(
    ("command", "task"),
    [
        ("stylize", "img2img"),
        ("inpaint", "img2img"),
        ("video", "video"),
        ("t2i-styled", "noise"),
        ("texture-expand", "noise"),
        ("texture", "noise"),
    ],
)
def test_each_command_opens_its_session_with_its_task(specs, tmp_path, command, task):
    with pytest.raises(Stop):
        run_command(command, tmp_path)
    assert len(specs) == 1
    spec = specs[0]
    assert (spec.task, spec.scheduler, spec.accelerator) == (task, "lcm", "auto")
    expected = {"img2img": STD_085, "video": STD_085, "noise": LCM_SDXL}[task]
    assert choose_accelerator(spec, "sdxl", turbo=False).source == expected


# --- the CLIP image encoder of each IP-Adapter ----------------------------------------------

# (repo, subfolder, weight file, encoder folder from the repo root). h94/IP-Adapter's file list:
# ViT-H in models/image_encoder, ViT-bigG in sdxl_models/image_encoder; OzzyGT/sdxl-ip-adapter
# keeps its adapters at the root next to image_encoder/ (the repo STD's README loads).
ENCODERS = [
    ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors", "models/image_encoder"),
    ("h94/IP-Adapter", "models", "ip-adapter_sd15_light.bin", "models/image_encoder"),
    ("h94/IP-Adapter", "models", "ip-adapter-plus_sd15.safetensors", "models/image_encoder"),
    ("h94/IP-Adapter", "models", "ip-adapter_sd15_vit-G.safetensors", "sdxl_models/image_encoder"),
    ("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder"),
    ("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.bin", "sdxl_models/image_encoder"),
    ("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder"),
    ("h94/IP-Adapter", "sdxl_models", "ip-adapter-plus_sdxl_vit-h.bin", "models/image_encoder"),
    (
        "h94/IP-Adapter",
        "sdxl_models",
        "ip-adapter-plus-face_sdxl_vit-h.bin",
        "models/image_encoder",
    ),
    ("OzzyGT/sdxl-ip-adapter", "", "ip-adapter-plus_sdxl_vit-h.safetensors", "image_encoder"),
    ("OzzyGT/sdxl-ip-adapter", "", "ip-adapter_sdxl_vit-h.safetensors", "image_encoder"),
    ("someone/adapters", "xl", "style.safetensors", "xl/image_encoder"),  # diffusers' default
]


@pytest.mark.parametrize(("repo", "sub", "weight", "encoder"), ENCODERS)
def test_image_encoder_choice_table(repo, sub, weight, encoder):
    assert image_encoder_folder(repo, sub, weight) == encoder
    hub_file = "/".join(p for p in (repo, sub, weight) if p)
    files = adapter_files(ModelSpec("x/y", ip_adapter=hub_file, allow_pickle=True), "sdxl")
    assert files == AdapterFiles(repo, sub, weight, encoder)


def test_default_adapters_and_their_encoders():
    sd15 = adapter_files(ModelSpec("x/y", ip_adapter="auto"), "sd15")
    sdxl = adapter_files(ModelSpec("x/y", ip_adapter="auto"), "sdxl")
    assert sd15 == AdapterFiles(
        "h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors", "models/image_encoder"
    )
    assert sdxl == AdapterFiles(  # STD's ViT-H adapter takes ViT-H, not the bigG next to it
        "h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder"
    )


def test_image_encoder_flag_overrides_the_choice(tmp_path, sd15_ip_adapter):
    hub = "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"
    inside = adapter_files(ModelSpec("x/y", ip_adapter=hub, image_encoder="enc/vit"), "sdxl")
    assert inside.image_encoder == "enc/vit"  # a folder of the adapter's repo
    folder = tmp_path / "my-encoder"
    folder.mkdir()
    local = adapter_files(ModelSpec("x/y", ip_adapter=hub, image_encoder=str(folder)), "sdxl")
    assert local.image_encoder == str(folder)
    mine = adapter_files(ModelSpec("x/y", ip_adapter=str(sd15_ip_adapter)), "sd15")
    assert mine.image_encoder == str(sd15_ip_adapter.absolute() / "image_encoder")


class FakePipe:
    """Records what the loader asks diffusers for; holds what it registers."""

    class unet:  # noqa: N801 - stands in for the pipeline's UNet attribute
        dtype, device = "fp32", "cpu"

    def __init__(self):
        self.calls = {}

    def register_modules(self, **modules):
        self.calls["register"] = modules

    def load_ip_adapter(self, repo, **kwargs):
        self.calls["adapter"] = (repo, kwargs)


@pytest.mark.parametrize(
    ("ip_adapter", "repo", "subfolder", "encoder"),
    [
        ("auto", "h94/IP-Adapter", "sdxl_models", "models/image_encoder"),
        (
            "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.bin",
            "h94/IP-Adapter",
            "sdxl_models",
            "sdxl_models/image_encoder",
        ),
        (
            "OzzyGT/sdxl-ip-adapter/ip-adapter-plus_sdxl_vit-h.safetensors",
            "OzzyGT/sdxl-ip-adapter",
            "",
            "image_encoder",
        ),
    ],
)
def test_load_ip_adapter_loads_the_chosen_encoder_from_the_repo_root(
    monkeypatch, ip_adapter, repo, subfolder, encoder
):
    from transformers import CLIPVisionModelWithProjection

    asked = []

    class Encoder:
        def to(self, device):
            return self

    def from_pretrained(*args, **kwargs):
        asked.append((args, kwargs))
        return Encoder()

    monkeypatch.setattr(CLIPVisionModelWithProjection, "from_pretrained", from_pretrained)
    pipe = FakePipe()
    models.load_ip_adapter(pipe, ModelSpec("x/y", ip_adapter=ip_adapter, allow_pickle=True), "sdxl")
    # the encoder folder is read from the repo's root, as chosen, not joined to the subfolder
    where = {"pretrained_model_name_or_path": repo, "subfolder": encoder, "dtype": "fp32"}
    assert asked == [((), where)]
    assert isinstance(pipe.calls["register"]["image_encoder"], Encoder)
    adapter_repo, kwargs = pipe.calls["adapter"]
    assert (adapter_repo, kwargs["subfolder"]) == (repo, subfolder)
    assert kwargs["image_encoder_folder"] is None  # diffusers must not load a second encoder
