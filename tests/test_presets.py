"""Presets: the built-in TOML files, validation errors that name key and file, flag precedence."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.engine.models import IP_ADAPTER, ModelSpec, accelerator_source
from stylekit.errors import PresetError, UsageError
from stylekit.media.metadata import read_metadata
from stylekit.presets import DEFAULT_PRESET, Settings, builtin_names, load_preset
from stylekit.session import resolve_settings

BUILTIN = ["animatediff-sd15", "animatelcm-sd15", "lcm-sd15", "sd-turbo", "std-sdxl"]


def write_preset(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the built-in presets --------------------------------------------------------------------


def test_builtin_names():
    assert builtin_names() == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_each_builtin_preset_loads_and_validates(name):
    settings = load_preset(name)
    assert isinstance(settings, Settings)
    assert settings.description and "\n" not in settings.description
    assert settings.purpose and "\n" not in settings.purpose
    assert settings.model.count("/") == 1  # a hub id: presets never point at local files
    # AnimateLCM's own LCM LoRA (a `loras` entry) is its accelerator
    assert settings.accelerator == ("none" if name == "animatelcm-sd15" else "auto")
    assert settings.with_overrides() == settings  # passes the same checks as command-line values


def test_std_sdxl_is_the_std_recipe():
    s = load_preset("std-sdxl")
    assert s.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (s.scheduler, s.gamma, s.cfg, s.steps, s.strength) == ("tcd", 0.0, 6.0, 8, 0.75)
    assert (s.style_mode, s.style_scale, s.ip_adapter) == ("ipadapter", 1.0, "auto")
    spec = ModelSpec(s.model, accelerator=s.accelerator, strength=s.strength)
    # the published file name (shared/specs/sampling.md), not the loader's f-string
    expected = "SecondComming/Single-Trajectory-Distillation/std_sdxl_i2i_eta0.75.safetensors"
    assert accelerator_source(spec, "sdxl", turbo=False) == expected
    assert IP_ADAPTER["sdxl"][2] == "ip-adapter_sdxl_vit-h.safetensors"  # STD's ViT-H adapter


def test_default_preset_and_defaults_are_std():
    assert DEFAULT_PRESET == "std-sdxl"
    assert load_preset(None) == load_preset("std-sdxl")
    preset, defaults = load_preset("std-sdxl"), Settings()
    # the negative prompt is the preset's only: other presets and TOML files start from the
    # defaults, and STD's SDXL negative prompt is no default for them
    for f in fields(Settings):
        if f.name not in ("description", "purpose", "variant", "negative"):
            assert getattr(defaults, f.name) == getattr(preset, f.name), f.name
    assert defaults.negative is None and load_preset("lcm-sd15").negative is None


# STD's README passes this negative prompt (A1111 weight syntax and the double space included).
STD_NEGATIVE = (
    "worst face, NSFW, nudity, nipples, (worst quality, low quality:1.4), blurred, low resolution, "
    "pixelated, dull colors, overly simplistic, harsh lighting, lack of detail, poorly composed, "
    "dark and gloomy atmosphere, (malformed hands:1.4), (poorly drawn hands:1.4), "
    "(mutated fingers:1.4), (extra limbs:1.35), (poorly  drawn face:1.4), missing legs, "
    "(extra legs:1.4), missing arms, extra arm, ugly, fat, (close shot:1.1), explicit content, "
    "sexual content, pornography, adult content, inappropriate, indecent, obscene, vulgar, "
    "suggestive, erotic, lewd, provocative, mature content"
)


def test_std_sdxl_carries_the_release_negative_prompt():
    settings = load_preset("std-sdxl")
    assert settings.negative == STD_NEGATIVE
    assert "\n" not in settings.negative  # the TOML line continuations leave no newline
    assert settings.with_overrides(negative="").negative == ""  # --negative "" drops it
    assert resolve_settings(None, None, {}).negative == STD_NEGATIVE  # the default preset


def test_other_builtins():
    lcm, turbo = load_preset("lcm-sd15"), load_preset("sd-turbo")
    assert (lcm.scheduler, lcm.steps, lcm.cfg, lcm.style_mode) == ("lcm", 4, 1.0, "ipadapter")
    assert "turbo" in turbo.model and turbo.style_mode == "none" and turbo.steps == 2
    assert accelerator_source(ModelSpec(turbo.model), "sd2", turbo=True) is None


# --- validation errors -----------------------------------------------------------------------


def test_unknown_key_names_key_and_file(tmp_path):
    path = write_preset(tmp_path, "steps = 4\nstyle_strenght = 0.5\n")
    with pytest.raises(PresetError) as info:
        load_preset(str(path))
    assert "style_strenght" in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, UsageError)  # exit 2 at the CLI


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('steps = "eight"', "steps"),
        ("steps = 4.5", "steps"),
        ("cfg = true", "cfg"),
        ("tiny_vae = 1", "tiny_vae"),
        ("loras = [1, 2]", "loras"),
        ("model = 3", "model"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    path = write_preset(tmp_path, text + "\n")
    with pytest.raises(PresetError, match="wrong type|list of strings") as info:
        load_preset(str(path))
    assert key in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "text", ["strength = 1.5", "strength = 0", "steps = 0", 'scheduler = "ddim"', "gamma = -1"]
)
def test_bad_value_names_key_and_file(tmp_path, text):
    path = write_preset(tmp_path, text + "\n")
    with pytest.raises(PresetError) as info:
        load_preset(str(path))
    assert text.split(" =")[0] in str(info.value) and str(path) in str(info.value)


def test_ints_are_accepted_for_floats(tmp_path):
    settings = load_preset(str(write_preset(tmp_path, "cfg = 2\nstrength = 1\n")))
    assert settings.cfg == 2.0 and isinstance(settings.cfg, float) and settings.strength == 1.0


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(PresetError, match="not valid TOML"):
        load_preset(str(write_preset(tmp_path, "steps = = 4\n")))
    with pytest.raises(PresetError, match="no such file"):
        load_preset(str(tmp_path / "absent.toml"))
    with pytest.raises(
        PresetError,
        match="unknown preset 'nope'; built-in: animatediff-sd15, animatelcm-sd15, lcm-sd15",
    ):
        load_preset("nope")


# --- precedence: defaults < preset < flags ---------------------------------------------------


def test_flags_override_the_preset():
    s = resolve_settings(None, "lcm-sd15", {"steps": 2, "cfg": None, "prompt": "a cat"})
    assert s.steps == 2 and s.prompt == "a cat"  # flags
    assert s.cfg == 1.0 and s.scheduler == "lcm" and s.strength == 0.6  # preset
    assert s.ad_iters == Settings().ad_iters  # default


def test_preset_file_over_defaults(tmp_path):
    path = write_preset(tmp_path, 'steps = 3\nscheduler = "lcm"\n')
    s = resolve_settings(None, str(path), {"scheduler": "tcd"})
    assert (s.steps, s.scheduler, s.cfg) == (3, "tcd", Settings().cfg)


def test_bad_flag_over_a_preset_is_refused():
    with pytest.raises(PresetError, match="command line: steps = 0"):
        resolve_settings(None, "lcm-sd15", {"steps": 0})
    with pytest.raises(PresetError, match="unknown setting"):
        resolve_settings(None, "lcm-sd15", {"stepz": 3})


def test_cli_flags_override_a_preset_file(tmp_path, sd15_path):
    preset = write_preset(
        tmp_path, 'scheduler = "lcm"\nsteps = 3\nstrength = 0.6\ncfg = 1.0\nprompt = "a dog"\n'
    )
    source = tmp_path / "a.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(source)
    out = tmp_path / "out.png"
    args = ["stylize", str(source), "-o", str(out), "--preset", str(preset), "--steps", "1"]
    args += ["--model", str(sd15_path), "--accelerator", "none", "--dtype", "fp32"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--seed", "0", "-q"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    meta = read_metadata(out)
    assert meta["steps"] == 1  # flag
    assert (meta["sampler"], meta["strength"], meta["cfg_scale"]) == ("LCM", 0.6, 1.0)  # preset
    assert meta["prompt"] == "a dog" and meta["model"] == str(sd15_path)


# --- `stylekit presets` ----------------------------------------------------------------------


def test_presets_command_marks_the_default_and_shows_model_steps_strength_and_purpose():
    result = CliRunner().invoke(app, ["presets"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = {line[2:].split()[0]: line for line in lines[1:-1] if line[2:3] != " "}
    assert sorted(rows) == BUILTIN and "* the default" in lines[-1]
    assert [name for name, line in rows.items() if line.startswith("*")] == [DEFAULT_PRESET]
    text = " ".join(result.stdout.split())
    for name, row in rows.items():
        s = load_preset(name)
        assert row[2:].split() == [name, s.model, str(s.steps), str(s.strength)]
        assert " ".join(s.purpose.split()) in text


def test_presets_command_json_is_one_record_per_preset():
    result = CliRunner().invoke(app, ["presets", "--json"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["name"] for r in records] == BUILTIN
    for record in records:
        s = load_preset(record["name"])
        assert record["default"] == (record["name"] == DEFAULT_PRESET)
        assert (record["model"], record["steps"], record["strength"]) == (
            s.model,
            s.steps,
            s.strength,
        )
        assert record["purpose"] == s.purpose and record["description"] == s.description
