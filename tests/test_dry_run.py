"""`--dry-run` (issue 16 §2): the plan on stdout, the real run's refusals, seeds that hold.

Every dry run here patches the model loader to fail: a dry run never loads a model.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.engine import models
from stylekit.media.video import ffmpeg_exe

RUNNER = CliRunner()


def write_image(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run(*args, model: Path, quiet: bool = False):
    flags = ["--model", str(model), "--accelerator", "none", "--device", "cpu", "--dtype", "fp32"]
    return RUNNER.invoke(app, [*map(str, args), *flags, *(["-q"] if quiet else [])])


@pytest.fixture
def no_load(monkeypatch):
    def load(spec):
        raise AssertionError("a dry run must not load the model")

    monkeypatch.setattr(models, "load", load)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


PLAN = re.compile(r"^(?P<input>\S+) -> (?P<output>\S+)  seed (?P<seed>\d+)  (?P<size>\d+x\d+)$")


def plan(stdout: str) -> list[dict]:
    """The plan lines of a dry run's stdout, parsed; every line must be one."""
    lines = stdout.splitlines()
    matches = [PLAN.match(line) for line in lines]
    assert lines and all(matches), stdout
    return [m.groupdict() for m in matches]


# --- the plan ----------------------------------------------------------------------------------


def test_plan_on_stdout_one_line_per_output(tmp_path, sd15_path, no_load):
    write_image(tmp_path / "in" / "a.png", (75, 53))
    write_image(tmp_path / "in" / "sub" / "b.png", (64, 64))
    out = tmp_path / "out"
    result = run("stylize", tmp_path / "in", "-o", out, "--seed", "7", "--dry-run", model=sd15_path)
    assert result.exit_code == 0, result.stderr
    assert plan(result.stdout) == [
        {
            "input": str(tmp_path / "in" / "a.png"),
            "output": str(out / "a.png"),
            "seed": "7",
            "size": "72x48",
        },
        {
            "input": str(tmp_path / "in" / "sub" / "b.png"),
            "output": str(out / "sub" / "b.png"),
            "seed": "8",
            "size": "64x64",
        },
    ]
    # no progress bar, no "done" summary; the rounding said once; nothing written
    assert "images" not in result.stderr and "done" not in result.stderr
    assert result.stderr.count("rounded down to multiples of 8") == 1
    assert (
        result.stderr.splitlines()[-1]
        == "dry run: 2 to write, 0 skipped, 0 would fail; nothing written"
    )
    assert not out.exists()


def test_plan_as_json_records(tmp_path, sd15_path, no_load):
    img = write_image(tmp_path / "a.png", (96, 80))
    args = ["stylize", img, "-o", tmp_path / "out", "--seed", "3", "--keep-size", "--dry-run"]
    result = run(*args, "--json", model=sd15_path)
    assert result.exit_code == 0, result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["status"] == "planned" and record["seed"] == 3 and record["size"] == "96x80"
    assert record["input"] == str(img) and record["output"] == str(tmp_path / "out" / "a.png")


def test_plan_lists_skipped_and_failing_inputs(tmp_path, sd15_path, no_load):
    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "c.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    write_image(out / "a.png")  # finished before: a rerun skips it
    result = run("stylize", tmp_path / "in", "-o", out, "--seed", "1", "--dry-run", model=sd15_path)
    assert result.exit_code == 1, result.stderr  # the real run would fail c.png: exit 1 too
    lines = result.stdout.splitlines()
    assert lines[0].endswith("a.png  skipped (exists; --overwrite to redo it)")
    assert lines[1].endswith("b.png  seed 2  64x64")
    assert "c.png  would fail: " in lines[2] and "not an image" in lines[2]
    assert "dry run: 1 to write, 1 skipped, 1 would fail" in result.stderr


def test_every_command_plans_its_sizes(tmp_path, sd15_path, no_load):
    """t2i at the model's native size, inpaint at the input's, textures at the exemplar's
    rounded to multiples of 8 or --size, video at the input's (frames kept at their size)."""
    img = write_image(tmp_path / "a.png", (75, 53))
    clip = tmp_path / "clip.mp4"
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi"]
    cmd += ["-i", "testsrc2=size=40x32:rate=10", "-frames:v", "3", "-c:v", "libx264", str(clip)]
    subprocess.run(cmd, check=True)
    native = models.read_configs(str(sd15_path))[0]["sample_size"] * 8
    cases = [
        (["t2i-styled", "a cat", "-n", "2", "--style-mode", "none"], [f"{native}x{native}"] * 2),
        (["t2i-styled", "a cat", "--size", "64x32", "--style-mode", "none"], ["64x32"]),
        (["inpaint", img, "--mask", img, "-o", tmp_path / "x"], []),  # every input is the mask
        (["texture", img], ["72x48"]),
        (["texture-expand", img, "--size", "128x64"], ["128x64"]),
        (["video", clip], ["40x32"]),
        (["video", clip, "--no-keep-size", "--size", "24x16"], ["24x16"]),
    ]
    for args, sizes in cases:
        result = run(*args, "--seed", "5", "--dry-run", model=sd15_path)
        if not sizes:
            assert result.exit_code == 2, result.stderr
            continue
        assert result.exit_code == 0, (args, result.stderr)
        assert [p["size"] for p in plan(result.stdout)] == sizes, args
        assert [int(p["seed"]) for p in plan(result.stdout)] == list(range(5, 5 + len(sizes)))
    other = write_image(tmp_path / "b.png", (40, 40))
    result = run("inpaint", img, "--mask", other, "--seed", "5", "--dry-run", model=sd15_path)
    assert result.exit_code == 0, result.stderr
    assert plan(result.stdout)[0]["size"] == "75x53"


# --- the real run's refusals, before any model loads -------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--steps", "8", "--strength", "0.1"], "8 steps at strength 0.1"),
        (["--style", "{tmp}/missing.png"], "missing.png: file not found"),
        (["--lora", "{tmp}/missing.safetensors"], "missing.safetensors: no such file"),
        (["-o", "{tmp}/a.png"], "would overwrite input"),
        (["-o", "{tmp}/out.jpg", "-f", "png"], "--format is png"),
        (["--style", "{tmp}/a.png", "--style-mode", "none"], "style mode is none"),
        (["--size", "32768x32768"], "--size 32768x32768"),
    ],
)
def test_dry_run_refuses_what_the_run_refuses(tmp_path, sd15_path, no_load, args, says):
    img = write_image(tmp_path / "a.png")
    args = [a.format(tmp=tmp_path) for a in args]
    for dry in (["--dry-run"], []):  # the real run stops before its model loads as well
        result = run("stylize", img, *args, "--seed", "1", *dry, model=sd15_path)
        assert result.exit_code == 2, (dry, result.stderr)
        (line,) = error_lines(result.stderr)
        assert says in line, line
        assert result.stdout == ""


def test_dry_run_refuses_a_missing_mask(tmp_path, sd15_path, no_load):
    img = write_image(tmp_path / "a.png")
    result = run("inpaint", img, "--mask", tmp_path / "nope.png", "--dry-run", model=sd15_path)
    assert result.exit_code == 2 and "--mask" in error_lines(result.stderr)[0]


def test_dry_run_refuses_an_output_folder_it_cannot_write(tmp_path, sd15_path, no_load):
    img = write_image(tmp_path / "a.png")
    (tmp_path / "file").write_text("x")
    result = run("stylize", img, "-o", tmp_path / "file" / "out", "--dry-run", model=sd15_path)
    assert result.exit_code == 2 and "is a file" in error_lines(result.stderr)[0]


# --- seeds -------------------------------------------------------------------------------------


def test_drawn_seeds_are_shown_with_how_to_pin_them(tmp_path, sd15_path, monkeypatch):
    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "b.png", seed=1)
    out = tmp_path / "out"
    dry = run("stylize", tmp_path / "in", "-o", out, "--steps", "1", "--dry-run", model=sd15_path)
    assert dry.exit_code == 0, dry.stderr
    (hint,) = [line for line in dry.stderr.splitlines() if "--seed" in line]
    base = int(re.search(r"add --seed (\d+)", hint)[1])
    planned = {p["output"]: int(p["seed"]) for p in plan(dry.stdout)}
    assert sorted(planned.values()) == [base, base + 1]
    real = run(
        "stylize",
        tmp_path / "in",
        "-o",
        out,
        "--steps",
        "1",
        "--seed",
        base,
        "--json",
        model=sd15_path,
    )
    assert real.exit_code == 0, real.stderr
    done = {r["output"]: r["seed"] for r in map(json.loads, real.stdout.splitlines())}
    assert done == planned


def test_given_seed_needs_no_hint(tmp_path, sd15_path, no_load):
    img = write_image(tmp_path / "a.png")
    result = run("stylize", img, "--seed", "9", "--dry-run", model=sd15_path)
    assert result.exit_code == 0 and "--seed" not in result.stderr


def test_dry_run_refuses_ad_on_an_inpainting_unet(tmp_path, sd15_inpaint_path, no_load):
    img, mask = write_image(tmp_path / "a.png"), write_image(tmp_path / "m.png")
    args = ["inpaint", img, "--mask", mask, "-o", tmp_path / "out", "--style", mask]
    result = run(*args, "--style-mode", "ad", "--dry-run", model=sd15_inpaint_path)
    assert result.exit_code == 2 and "inpainting UNet" in error_lines(result.stderr)[0]
