"""`stylekit doctor`: the report's facts are the ones a run would use, and its exit code says
whether the checked preset can run (offline: only from the cache)."""

from __future__ import annotations

import json
from importlib import metadata

import imageio_ffmpeg
from test_models_cmd import fill_lcm_sd15
from typer.testing import CliRunner

from stylekit import __version__
from stylekit.cli import app
from stylekit.engine import models

RUNNER = CliRunner()


def doctor(*args: str):
    return RUNNER.invoke(app, ["doctor", *args])


def test_json_report_matches_what_a_run_would_pick(tmp_path):
    fill_lcm_sd15(tmp_path / "hub")
    args = (
        "--preset",
        "lcm-sd15",
        "--cache-dir",
        str(tmp_path / "hub"),
        "-o",
        str(tmp_path / "out"),
    )
    result = doctor(*args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["versions"]["stylekit"] == __version__
    for name in ("torch", "diffusers", "transformers", "peft"):
        assert report["versions"][name] == metadata.version(name)
    device = models.resolve_device("auto")
    dtype = models.resolve_dtype("auto", device)
    assert report["device"]["auto"] == device.type
    assert models.DTYPES[report["device"]["dtype"]] == dtype
    assert report["device"]["dtype_reason"] == models.auto_dtype_reason(device)
    assert report["device"]["devices"][0]["device"] == "cpu"
    assert report["ffmpeg"]["path"] == imageio_ffmpeg.get_ffmpeg_exe()
    assert report["ffmpeg"]["version"].startswith("ffmpeg version")
    assert report["ffmpeg"]["encoders"] == {"libx264": True, "aac": True}
    assert report["hub"]["offline"] is True  # conftest
    assert report["hub"]["presets"]["lcm-sd15"]["complete"] is True
    assert report["hub"]["presets"]["std-sdxl"]["complete"] is False
    assert report["output"] == {"folder": str(tmp_path / "out"), "writable": True}
    assert report["ok"] is True and report["problems"] == []
    text = doctor(*args)
    assert text.exit_code == 0
    assert "ready: preset lcm-sd15 can run" in text.stdout
    assert "lcm-sd15     complete" in text.stdout


def test_offline_with_the_default_preset_not_cached_exits_1_saying_what_is_missing(tmp_path):
    result = doctor("--cache-dir", str(tmp_path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1
    assert "preset std-sdxl" in problems[0]
    assert "stabilityai/stable-diffusion-xl-base-1.0/model_index.json" in problems[0]
    assert "HF_HUB_OFFLINE" in problems[0]
    assert "not ready: preset std-sdxl cannot run" in result.stdout


def test_an_output_folder_that_cannot_be_written_fails(tmp_path):
    fill_lcm_sd15(tmp_path / "hub")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = doctor(
        "--preset", "lcm-sd15", "--cache-dir", str(tmp_path / "hub"), "-o", str(blocker), "--json"
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["output"]["writable"] is False
    assert any("is a file, not a folder" in p for p in report["problems"])
