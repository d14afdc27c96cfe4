"""Model families and turbo models through the commands: SD 2.x runs everything but IP-Adapter,
says once that no accelerator is loaded, and refuses IP-Adapter with a pointer to AD; turbo is
the released models or `--turbo`, and a look-alike name gets a notice, not a silent change.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import typer.main
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.presets import Settings, from_dict, read_preset

RUNNER = CliRunner()
REPO = Path(__file__).resolve().parents[1]
SD2_NOTICE = "is SD 2.x: no few-step LoRA"


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def cpu(model: Path, *extra: str) -> list[str]:
    """Run a tiny local model on the CPU, 2 steps, JSON records, no progress bars."""
    return [
        *("--model", str(model), "--device", "cpu", "--dtype", "fp32", "--steps", "2"),
        *("--scheduler", "tcd", "--seed", "1", "-q", "--json", *extra),
    ]


def invoke(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def statuses(result) -> list[str]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return [json.loads(line)["status"] for line in lines]


# --- SD 2.x ------------------------------------------------------------------------------------


def test_sd2_stylize_with_ad_and_tiny_vae_notes_the_missing_accelerator_once(
    sd2_path, tiny_vae_path, tmp_path
):
    (tmp_path / "in").mkdir()
    for i in range(2):
        write_image(tmp_path / "in" / f"{i}.png", i)
    ref = write_image(tmp_path / "ref.png", 9)
    result = invoke(
        "stylize", tmp_path / "in", "-o", tmp_path / "out",
        *cpu(sd2_path, "--accelerator", "auto", "--tiny-vae-model", str(tiny_vae_path)),
        *("--style", ref, "--style-mode", "ad", "--ad-iters", "1"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert statuses(result) == ["done", "done"]
    stderr = " ".join(result.stderr.split())  # the console may wrap a long line
    assert stderr.count(SD2_NOTICE) == 1, result.stderr
    assert "--accelerator" in stderr
    for i in range(2):
        assert Image.open(tmp_path / "out" / f"{i}.png").size == (64, 64)


@pytest.mark.parametrize("style_mode", ["ipadapter", "both"])
def test_sd2_with_ip_adapter_is_a_usage_error_pointing_to_ad(sd2_path, tmp_path, style_mode):
    content, ref = write_image(tmp_path / "a.png"), write_image(tmp_path / "ref.png", 1)
    result = invoke(
        "stylize", content, "-o", tmp_path / "out", *cpu(sd2_path, "--accelerator", "none"),
        *("--style", ref, "--style-mode", style_mode),
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SD 2.x" in errors[0] and "--style-mode ad" in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from imageio_ffmpeg import get_ffmpeg_exe

    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    cmd = [get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    cmd += ["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10", "-frames:v", "3"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv444p", str(path)]
    subprocess.run(cmd, check=True)
    return path


COMMANDS = {  # every other command on SD 2.x, AD-guided where the command takes references
    "t2i-styled": lambda tmp, ref, clip: ["t2i-styled", "a cat", "--size", "64x64", "--style", ref],
    "inpaint": lambda tmp, ref, clip: [
        "inpaint",
        write_image(tmp / "a.png"),
        "--mask",
        _mask(tmp / "m.png"),
        "--style",
        ref,
        "--style-mode",
        "ad",
    ],  # fmt: skip
    "video": lambda tmp, ref, clip: ["video", clip, "--style", ref, "--style-mode", "ad"],
    "texture-expand": lambda tmp, ref, clip: ["texture-expand", ref, "--size", "128x64"],
    "texture": lambda tmp, ref, clip: ["texture", ref, "--size", "64x64"],
}


def _mask(path: Path) -> Path:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(path)
    return path


@pytest.mark.parametrize("command", list(COMMANDS))
def test_sd2_runs_every_other_command(sd2_path, tmp_path, clip, command):
    ref = write_image(tmp_path / "ref.png", 3)
    args = COMMANDS[command](tmp_path, ref, clip)
    result = invoke(*args, "-o", tmp_path / "out", *cpu(sd2_path, "--ad-iters", "1"))
    assert result.exit_code == 0, result.output
    assert statuses(result) == ["done"]
    stderr = " ".join(result.stderr.split())  # the console may wrap a long line
    assert stderr.count(SD2_NOTICE) == 1, result.stderr


# --- turbo -------------------------------------------------------------------------------------


def test_every_command_has_turbo_next_to_accelerator():
    commands = typer.main.get_command(app).commands
    batch = [name for name in commands if name not in ("presets", "models", "doctor")]
    assert len(batch) == 7  # the six batch commands and sweep
    for name in batch:
        params = [p.name for p in commands[name].params]
        assert params[params.index("accelerator") + 1] == "turbo", name
        option = next(p for p in commands[name].params if p.name == "turbo")
        assert option.opts == ["--turbo"] and option.secondary_opts == ["--no-turbo"]


@pytest.fixture
def look_alike(sd15_path, tmp_path) -> Path:
    """A local SD1.5 folder whose name merely contains "turbo"."""
    folder = tmp_path / "dreamshaper-turbo"
    folder.symlink_to(sd15_path, target_is_directory=True)
    return folder


def test_turbo_by_name_is_a_notice_and_turbo_flag_decides(look_alike, tmp_path):
    content = write_image(tmp_path / "a.png")
    outputs = {}
    for flag in ("", "--turbo", "--no-turbo"):
        out = tmp_path / f"out{flag}.png"
        extra = [flag] if flag else []
        result = invoke(
            "stylize", content, "-o", out, *cpu(look_alike, "--accelerator", "none", *extra)
        )
        assert result.exit_code == 0, result.output
        stderr = " ".join(result.stderr.split())
        notices = stderr.count("looks like a turbo model by name; pass --turbo")
        assert notices == (1 if not flag else 0), (flag, result.stderr)
        outputs[flag] = np.asarray(Image.open(out), dtype=np.int16)
    # without the flag nothing changed silently: the consistency grid, as --no-turbo
    assert np.array_equal(outputs[""], outputs["--no-turbo"])
    # --turbo switches to the trailing schedule (679, 339 → 666, 332 here): another image,
    # though close on a random tiny model (measured: 0.97 levels on average)
    assert np.abs(outputs["--turbo"] - outputs[""]).mean() > 0.3


def test_turbo_look_alike_keeps_the_accelerator(look_alike, tmp_path):
    """`--accelerator auto` on a look-alike still asks for SD1.5's TCD-LoRA (offline here, so the
    load fails naming it); with --turbo it asks for none and runs."""
    content = write_image(tmp_path / "a.png")
    auto = invoke("stylize", content, "-o", tmp_path / "o.png", *cpu(look_alike))
    assert auto.exit_code != 0 and "TCD-SD15-LoRA" in auto.output
    turbo = invoke("stylize", content, "-o", tmp_path / "o.png", *cpu(look_alike, "--turbo"))
    assert turbo.exit_code == 0, turbo.output


def test_sd_turbo_preset_sets_turbo_and_another_model_resets_it():
    data, source = read_preset(str(REPO / "presets" / "sd-turbo.toml"))
    assert data["turbo"] is True
    preset = from_dict(data, source=source)
    assert preset.turbo is True
    assert preset.with_overrides(steps=1).turbo is True
    assert preset.with_overrides(model=preset.model).turbo is True
    assert preset.with_overrides(model="me/my-model").turbo is None  # detected again
    assert preset.with_overrides(model="me/my-model", turbo=True).turbo is True
    assert Settings().turbo is None
    assert Settings().with_overrides(turbo=False).turbo is False
