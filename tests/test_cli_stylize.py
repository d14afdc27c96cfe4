"""The `stylekit stylize` contract, end to end through the CLI, on tiny random models.

Most runs go through `typer.testing.CliRunner` (click 8.2+ keeps stdout and stderr apart);
what must hold for a fresh interpreter (imports, exit codes) runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main
from PIL import Image
from typer.testing import CliRunner

from stylekit import __version__
from stylekit.cli import app
from stylekit.engine import models
from stylekit.media.metadata import EXIF_IFD, USER_COMMENT, read_metadata, read_parameters
from stylekit.presets import load_preset

RUNNER = CliRunner()


# --- helpers ---------------------------------------------------------------------------------


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    """Write a random RGB image (format from the extension); return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def tiny(model: Path, *, steps: int = 2) -> list[str]:
    """Flags that run a tiny local model on the CPU without any hub download."""
    return [
        *("--model", str(model), "--accelerator", "none"),
        *("--dtype", "fp32", "--device", "cpu", "--steps", str(steps)),
    ]


def stylize(*args, model: Path, seed: int | None = 1, quiet: bool = True):
    """Run `stylekit stylize ARGS` on the tiny model in-process; return click's Result."""
    extra = [*tiny(model), *(["--seed", str(seed)] if seed is not None else [])]
    return RUNNER.invoke(app, ["stylize", *map(str, args), *extra, *(["-q"] if quiet else [])])


def pixels(path: Path) -> np.ndarray:
    """Decode an output as floats in [0, 1]."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def files_under(root: Path) -> list[str]:
    """Every file under `root` (hidden ones included), relative, sorted."""
    return sorted(
        Path(folder, name).relative_to(root).as_posix()
        for folder, _, names in os.walk(root)
        for name in names
    )


def records(stdout: str) -> list[dict]:
    """Parse `--json` output: every stdout line must be one JSON object."""
    lines = stdout.splitlines()
    assert lines, "no JSON records on stdout"
    return [json.loads(line) for line in lines]


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines the CLI printed."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(result, code: int) -> str:
    """Assert the run exited with `code` and printed exactly one error line; return it."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An input tree: a.png, sub/b.png, sub/deeper/c.jpg (64x64 each)."""
    root = tmp_path / "in"
    write_image(root / "a.png", 0)
    write_image(root / "sub" / "b.png", 1)
    write_image(root / "sub" / "deeper" / "c.jpg", 2)
    return root


# --- inputs and output naming ----------------------------------------------------------------


def test_folder_input_mirrors_tree(folder, tmp_path, sd15_path):
    out = tmp_path / "out"
    result = stylize(folder, "-o", out, model=sd15_path)
    assert result.exit_code == 0, result.stderr
    assert files_under(out) == ["a.png", "sub/b.png", "sub/deeper/c.png"]
    assert "3 done, 0 skipped, 0 failed" in result.stderr
    for name in files_under(out):
        assert Image.open(out / name).size == (64, 64)


def test_glob_input_mirrors_tree_under_its_fixed_folder(folder, tmp_path, sd15_path):
    out = tmp_path / "out"
    result = stylize(str(folder / "**" / "*.png"), "-o", out, model=sd15_path)
    assert result.exit_code == 0, result.stderr
    assert files_under(out) == ["a.png", "sub/b.png"]


def test_single_input_with_file_out_writes_exactly_that_file(folder, tmp_path, sd15_path):
    out = tmp_path / "result" / "styled.jpg"
    result = stylize(folder / "a.png", "-o", out, model=sd15_path)
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "result") == ["styled.jpg"]
    assert Image.open(out).format == "JPEG"


def test_same_stem_inputs_get_distinct_outputs(tmp_path, sd15_path):
    a_png = write_image(tmp_path / "in" / "a.png", 0)
    a_jpg = write_image(tmp_path / "in" / "a.jpg", 1)
    out = tmp_path / "out"
    result = stylize(a_png, a_jpg, "-o", out, "--json", model=sd15_path)
    assert result.exit_code == 0, result.stderr
    written = {r["input"]: r["output"] for r in records(result.stdout)}
    assert written == {str(a_png): str(out / "a.png"), str(a_jpg): str(out / "a-1.png")}
    assert files_under(out) == ["a-1.png", "a.png"]
    assert not np.array_equal(pixels(out / "a.png"), pixels(out / "a-1.png"))


@pytest.mark.parametrize("single", [False, True], ids=["folder-into-itself", "file-onto-itself"])
def test_output_never_overwrites_an_input(tmp_path, sd15_path, single):
    source = write_image(tmp_path / "in" / "a.png", 0)
    before = source.read_bytes()
    target = source if single else source.parent
    result = stylize(target, "-o", target, model=sd15_path)
    line = one_error(result, 2)
    assert "would overwrite input" in line and "a.png" in line
    assert source.read_bytes() == before
    assert files_under(tmp_path / "in") == ["a.png"]


# --- skipping, overwriting, resuming, interrupting -------------------------------------------


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, sd15_path):
    source = write_image(tmp_path / "in" / "a.png", 0)
    out = tmp_path / "out"
    assert stylize(source, "-o", out, model=sd15_path, seed=1).exit_code == 0
    target = out / "a.png"
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))  # an old mtime: any write would show
    before = target.read_bytes()

    result = stylize(source, "-o", out, "--json", model=sd15_path, seed=2, quiet=False)
    assert result.exit_code == 0, result.stderr
    assert [r["status"] for r in records(result.stdout)] == ["skipped"]
    assert "skipping 1 existing" in result.stderr
    assert target.stat().st_mtime_ns == 1_000_000_000 and target.read_bytes() == before

    result = stylize(source, "-o", out, "--overwrite", model=sd15_path, seed=2)
    assert result.exit_code == 0, result.stderr
    assert target.stat().st_mtime_ns != 1_000_000_000
    assert read_metadata(target)["seed"] == 2


def interrupt_second(monkeypatch, *, during_save: bool = False) -> None:
    """Raise KeyboardInterrupt on the 2nd model call, or half-way through writing the 2nd output.

    The model is interrupted at `img2img`, which every image-to-image path calls once per UNet batch
    (one image, or several of one size when the runner batches them).
    """
    import stylekit.engine.img2img as engine

    calls = []
    real = Image.Image.save if during_save else engine.img2img

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if during_save:
                args[1].write(b"\x89PNG\r\n\x1a\n half an image")  # into the atomic temp file
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    if during_save:
        monkeypatch.setattr(Image.Image, "save", interrupting)
    else:
        monkeypatch.setattr(engine, "img2img", interrupting)


@pytest.mark.parametrize("during_save", [False, True], ids=["in-model", "in-save"])
def test_interrupt_keeps_finished_outputs_and_leaves_no_part_files(
    folder, tmp_path, sd15_path, monkeypatch, during_save
):
    out = tmp_path / "out"
    interrupt_second(monkeypatch, during_save=during_save)
    result = stylize(folder, "-o", out, "--batch-size", "1", model=sd15_path, seed=10)
    assert result.exit_code == 130, (result.stderr, result.exception)
    assert "interrupted" in result.stderr
    kept = files_under(out)  # no sub/.b.png.*.part, no half-written image
    assert kept[0] == "a.png" and "sub/deeper/c.png" not in kept
    assert not any(name.endswith(".part") for name in kept)
    first = {name: (out / name).read_bytes() for name in kept}
    for i, name in enumerate(kept):
        assert read_metadata(out / name)["seed"] == 10 + i  # complete files only

    monkeypatch.undo()  # the rerun resumes: only the missing outputs are made
    result = stylize(folder, "-o", out, "--json", model=sd15_path, seed=10)
    assert result.exit_code == 0, result.stderr
    status = {
        Path(r["output"]).relative_to(out).as_posix(): (r["status"], r["seed"])
        for r in records(result.stdout)
    }
    expected = ["a.png", "sub/b.png", "sub/deeper/c.png"]
    assert status == {
        name: ("skipped", None) if name in kept else ("done", 10 + i)
        for i, name in enumerate(expected)
    }
    assert {name: (out / name).read_bytes() for name in kept} == first
    assert files_under(out) == expected


def test_resume_gives_each_image_the_seed_of_a_full_run(folder, tmp_path, sd15_path):
    full, partial = tmp_path / "full", tmp_path / "partial"
    assert stylize(folder, "-o", full, model=sd15_path, seed=3).exit_code == 0
    assert stylize(folder, "-o", partial, model=sd15_path, seed=3).exit_code == 0
    (partial / "sub" / "b.png").unlink()
    result = stylize(folder, "-o", partial, "--json", model=sd15_path, seed=3)
    assert [r["status"] for r in records(result.stdout)] == ["skipped", "skipped", "done"]
    for i, name in enumerate(files_under(full)):
        assert read_metadata(partial / name) == read_metadata(full / name)
        assert read_metadata(partial / name)["seed"] == 3 + i
        # alone on the rerun vs in a batch the first time: equal up to float noise
        assert np.abs(pixels(full / name) - pixels(partial / name)).max() <= 1 / 255, name


# --- failures --------------------------------------------------------------------------------


def test_bad_files_are_reported_and_the_rest_done(tmp_path, sd15_path):
    root = tmp_path / "in"
    write_image(root / "a.png", 0)
    write_image(root / "c.png", 2)
    (root / "notes.png").write_text("this is not an image\n")
    whole = write_image(tmp_path / "whole.png", 3).read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"

    result = stylize(root, "-o", out, model=sd15_path)
    assert result.exit_code == 1, (result.stderr, result.exception)
    assert files_under(out) == ["a.png", "c.png"]
    lines = result.stderr.splitlines()
    bad = {root / "notes.png": "not an image", root / "truncated.png": "truncated"}
    for path, reason in bad.items():
        assert any(str(path) in line and reason in line for line in lines), (path, result.stderr)
    assert "2 done, 0 skipped, 2 failed" in lines


# --- usage errors ----------------------------------------------------------------------------


def test_unknown_preset_is_a_usage_error(folder, sd15_path):
    line = one_error(stylize(folder, "--preset", "no-such-preset", model=sd15_path), 2)
    assert "no-such-preset" in line and "std-sdxl" in line


def test_preset_file_with_unknown_key_names_key_and_file(folder, tmp_path, sd15_path):
    preset = tmp_path / "mine.toml"
    preset.write_text('steps = 2\nstyle_strenght = 0.5\nmodel = "x/y"\n')
    line = one_error(stylize(folder, "--preset", preset, model=sd15_path), 2)
    assert "style_strenght" in line and str(preset) in line


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--steps", "0"], ["steps", "0"]),
        (["--size", "10x10"], ["10x10", "multiples of 8"]),
        (["--size", "big"], ["big"]),
        (["--strength", "1.5"], ["strength", "1.5"]),
        (["--max-size", "4"], ["--max-size", "4"]),
        (["--format", "gif"], ["gif"]),
    ],
)
def test_bad_flag_values_are_usage_errors(folder, tmp_path, sd15_path, flags, words):
    out = tmp_path / "out"
    result = RUNNER.invoke(app, ["stylize", str(folder), "-o", str(out), *tiny(sd15_path), *flags])
    line = one_error(result, 2)
    assert all(w in line for w in words), line
    assert not out.exists()


@pytest.mark.parametrize("spec", ["missing.png", "nowhere/*.png", "empty"])
def test_nothing_matched_is_a_usage_error(tmp_path, sd15_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    line = one_error(stylize(spec, model=sd15_path), 2)
    assert spec in line
    assert not (tmp_path / "stylized").exists()


# --- JSON records and dry runs ---------------------------------------------------------------


def test_json_prints_one_record_per_output(folder, tmp_path, sd15_path):
    out = tmp_path / "out"
    result = stylize(folder, "-o", out, "--json", "--prompt", "a cat", model=sd15_path, seed=7)
    assert result.exit_code == 0, result.stderr
    recs = records(result.stdout)
    assert [Path(r["output"]).relative_to(out).as_posix() for r in recs] == files_under(out)
    for i, r in enumerate(recs):
        assert {"input", "output", "seconds", "seed", "settings"} <= set(r)
        assert r["status"] == "done" and r["seconds"] > 0 and r["seed"] == 7 + i
        assert Path(r["input"]).is_file()
        assert r["settings"]["seed"] == 7 + i and r["settings"]["prompt"] == "a cat"
        assert r["settings"]["steps"] == 2 and r["settings"]["model"] == str(sd15_path)


def test_json_goes_to_stdout_even_when_stderr_is_a_terminal(
    folder, tmp_path, sd15_path, monkeypatch
):
    """`stylekit stylize ... --json > records.jsonl` in a terminal: the progress bar must not swallow stdout."""
    from rich.console import Console

    import stylekit.cli

    monkeypatch.setattr(stylekit.cli, "err", Console(stderr=True, force_terminal=True))
    result = stylize(
        folder / "a.png", "-o", tmp_path / "out", "--json", model=sd15_path, quiet=False
    )
    assert result.exit_code == 0, result.stderr
    assert [r["status"] for r in records(result.stdout)] == ["done"]
    assert '"status"' not in result.stderr


def test_dry_run_writes_nothing_and_lists_planned_outputs(folder, tmp_path, sd15_path, monkeypatch):
    def no_model(spec):
        raise AssertionError("a dry run must not load the model")

    monkeypatch.setattr(models, "load", no_model)
    out = tmp_path / "out"
    result = stylize(folder, "-o", out, "--dry-run", "--json", model=sd15_path, seed=4)
    assert result.exit_code == 0, result.stderr
    planned = [(Path(r["output"]), r["status"], r["seed"]) for r in records(result.stdout)]
    assert planned == [
        (out / "a.png", "planned", 4),
        (out / "sub" / "b.png", "planned", 5),
        (out / "sub" / "deeper" / "c.png", "planned", 6),
    ]
    result = stylize(folder, "-o", out, "--dry-run", model=sd15_path, seed=4)
    assert result.exit_code == 0
    listed = result.stdout.splitlines()  # the plan is on stdout, one line per output
    assert len(listed) == 3
    for line, (path, _, seed) in zip(listed, planned, strict=True):
        assert f" -> {path}  seed {seed}  64x64" in line
    assert not out.exists()


# --- seeds and metadata ----------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different_image(tmp_path, sd15_path):
    source = write_image(tmp_path / "a.png", 0)
    for name, seed in [("one", 5), ("two", 5), ("three", 6)]:
        result = stylize(source, "-o", tmp_path / name, model=sd15_path, seed=seed)
        assert result.exit_code == 0, result.stderr
    one, two, three = (tmp_path / n / "a.png" for n in ("one", "two", "three"))
    assert one.read_bytes() == two.read_bytes()
    assert np.abs(pixels(one) - pixels(three)).mean() > 1e-3


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_each_output_carries_its_own_settings(folder, tmp_path, sd15_path, fmt):
    out = tmp_path / "out"
    args = [folder / "a.png", folder / "sub" / "b.png", "-o", out, "--format", fmt]
    result = stylize(*args, "--prompt", "a red cat", "--strength", "0.5", model=sd15_path, seed=20)
    assert result.exit_code == 0, result.stderr
    for seed, name in [(20, "a"), (21, "b")]:
        path = out / f"{name}.{fmt}"
        meta = read_metadata(path)
        assert meta["seed"] == seed and meta["steps"] == 2 and meta["strength"] == 0.5
        assert meta["model"] == str(sd15_path) and meta["input"] == f"{name}.png"
        assert meta["stylekit"] == __version__
        text = read_parameters(path)
        first, negative, params = text.split("\n")
        assert first == "a red cat"
        assert negative == f"Negative prompt: {load_preset(None).negative}"  # the preset's, STD's
        assert params.startswith("Steps: 2, Sampler: TCD, CFG scale: 6.0, ")
        assert f"Seed: {seed}, Size: 64x64, " in params and "Denoising strength: 0.5" in params
        with Image.open(path) as img:
            if fmt == "png":
                assert img.text["parameters"] == text
            else:
                comment = img.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
                assert comment == b"UNICODE\0" + text.encode("utf-16-be")


# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_size", "flags", "expected"),
    [
        ((96, 80), ["--size", "64x64"], (64, 64)),
        ((96, 64), ["--max-size", "48"], (48, 32)),
        ((64, 64), ["--max-size", "128"], (64, 64)),  # never scaled up
        ((70, 67), [], (64, 64)),  # rounded down to multiples of 8
    ],
)
def test_output_size(tmp_path, sd15_path, source_size, flags, expected):
    source = write_image(tmp_path / "in.png", 0, source_size)
    out = tmp_path / "out.png"
    result = stylize(source, "-o", out, *flags, model=sd15_path)
    assert result.exit_code == 0, result.stderr
    assert Image.open(out).size == expected
    assert read_metadata(out)["size"] == "{}x{}".format(*expected)


# --- every command keeps its options ----------------------------------------------------------

SHARED_FLAGS = {"--out", "--preset", "--model", "--lora", "--steps", "--cfg", "--seed", "--format"}
SHARED_FLAGS |= {"--suffix", "--overwrite", "--dry-run", "--json", "--quiet", "--device", "--dtype"}
SHARED_FLAGS |= {"--allow-pickle", "--model-config", "--tiny-vae", "--ad-iters", "--style-mode"}
REFERENCE_FLAGS = {"--style", "--ip-adapter", "--image-encoder", "--style-scale"}
OPTIONS = {  # command: (flags it must have, flags it must not have)
    "stylize": (
        {"--strength", "--batch-size", "--mode", "--opt-steps", "--size", "--max-size", "--prompt"}
        | {"--content-weight", "--max-pixels", "--keep-size"}
        | REFERENCE_FLAGS,
        {"--count", "--mask", "--mask-padding", "--no-keep-size"},
    ),
    "t2i-styled": (
        {"--count", "--size", "--negative"} | REFERENCE_FLAGS,
        {"--prompt", "--strength", "--content-weight", "--max-size", "--mode", "--batch-size"}
        | {"--max-pixels", "--keep-size"},
    ),
    "inpaint": (
        {"--mask", "--invert-mask", "--mask-blur", "--strength", "--prompt", "--max-size"}
        | {"--size", "--max-pixels", "--mask-padding"}
        | REFERENCE_FLAGS,
        {"--mode", "--batch-size", "--keep-size"},  # the output always has the input's size
    ),
    "video": (
        {"--frames-out", "--consistency", "--every", "--codec", "--crf", "--strength"}
        | {"--max-size", "--size", "--max-pixels", "--keep-size", "--no-keep-size"}
        | REFERENCE_FLAGS,
        {"--mode", "--batch-size"},
    ),
    "texture-expand": (
        {"--size", "--window", "--stride", "--view-batch", "--seamless", "--max-size", "--prompt"},
        {"--strength", "--content-weight", "--mode", "--source-mask", "--max-pixels"}
        | REFERENCE_FLAGS,
    ),
    "texture": (
        {"--size", "--mode", "--opt-steps", "--source-mask", "--target-mask", "--seamless"},
        {"--strength", "--content-weight", "--batch-size", "--keep-size"} | REFERENCE_FLAGS,
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_command_has_its_options(name):
    """A command loses no option it had and gains none that is not its own."""
    command = typer.main.get_command(app).commands[name]
    names = [flag for param in command.params for flag in (*param.opts, *param.secondary_opts)]
    flags = {flag for flag in names if flag.startswith("--")}
    wanted, unwanted = OPTIONS[name]
    assert wanted | SHARED_FLAGS <= flags, sorted((wanted | SHARED_FLAGS) - flags)
    assert not unwanted & flags, sorted(unwanted & flags)


def test_command_specific_help_text_and_defaults():
    """Options that differ between commands keep their own help text, default and kind."""
    commands = typer.main.get_command(app).commands
    params = {name: {p.name: p for p in c.params} for name, c in commands.items()}
    assert "mp4" in params["video"]["fmt"].help and "png" in params["stylize"]["fmt"].help
    assert "frames" in params["video"]["max_size"].help
    assert "exemplars" in params["texture"]["max_size"].help
    assert params["texture-expand"]["size"].required and not params["texture"]["size"].required
    assert params["t2i-styled"]["prompt_text"].param_type_name == "argument"
    assert params["video"]["consistency"].default == "noise"
    assert params["inpaint"]["mask_blur"].default == 4
    assert params["inpaint"]["mask_padding"].default == 32
    assert "crop" in params["inpaint"]["size"].help
    assert params["video"]["keep_size"].default is True
    assert params["stylize"]["keep_size"].default is False
    assert params["stylize"]["device"].default == "auto"


# --- the CLI starts fast ---------------------------------------------------------------------

NO_TORCH = """
import runpy, sys
for argv in (["stylekit", "--help"], ["stylekit", "stylize", "--help"], ["stylekit", "--version"]):
    sys.argv = argv
    try:
        runpy.run_module("stylekit.cli", run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
    else:
        raise AssertionError(f"{argv} did not exit")
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
assert not heavy, heavy
print("NO-HEAVY-IMPORTS")
"""


def test_help_and_version_do_not_import_torch(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "stylize" in done.stdout and "--style" in done.stdout and "--steps" in done.stdout
    assert f"stylekit {__version__}" in done.stdout
    assert done.stdout.rstrip().endswith("NO-HEAVY-IMPORTS")


def test_real_process_exit_code_and_streams(tmp_path, sd15_path):
    """In a real process: records alone on stdout, failures on stderr, exit 1 when one failed."""
    good = write_image(tmp_path / "good.png", 0)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    command = [sys.executable, "-m", "stylekit.cli", "stylize", str(good), str(bad)]
    command += ["-o", str(tmp_path / "out"), "--json", *tiny(sd15_path), "--seed", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    status = {Path(r["input"]).name: r["status"] for r in records(done.stdout)}
    assert status == {"good.png": "done", "bad.png": "failed"}
    assert any(str(bad) in line and "not an image" in line for line in done.stderr.splitlines())
    assert "1 done, 0 skipped, 1 failed" in done.stderr
    assert files_under(tmp_path / "out") == ["good.png"]


# --- model errors ----------------------------------------------------------------------------


def test_missing_local_model_is_one_line(folder, tmp_path, sd15_path):
    missing = tmp_path / "does" / "not" / "exist"
    result = stylize(folder, "-o", tmp_path / "out", model=missing)
    line = one_error(result, 2)  # a setup error: nothing could start
    assert str(missing) in line and "no such file or folder" in line
    assert not (tmp_path / "out").exists()


def test_relative_missing_model_is_one_line(folder, tmp_path, sd15_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error(stylize(folder, model=Path("does/not/exist")), 2)
    assert "does/not/exist" in line


def test_uncached_hub_model_fails_fast_offline(folder, tmp_path):
    start = time.perf_counter()
    result = stylize(folder, "-o", tmp_path / "out", model=Path("nobody-here/not-a-cached-model"))
    line = one_error(result, 2)
    assert time.perf_counter() - start < 30  # no network retries
    assert "nobody-here/not-a-cached-model" in line and "offline" in line
    assert "local folder" in line  # tells the user how to do without the hub


def test_pickle_checkpoint_is_refused(folder, tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really a pickle")
    line = one_error(stylize(folder, "-o", tmp_path / "out", model=checkpoint), 2)
    assert str(checkpoint) in line and "--allow-pickle" in line
    assert not (tmp_path / "out").exists()


# --- single-file checkpoints -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_ckpt(sd15_single_file, tmp_path_factory):
    """The tiny SD1.5 as a pickled original-layout `.ckpt` (`{"state_dict": ...}`, as SD 1.x shipped)."""
    import torch
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("ckpt") / "sd15.ckpt"
    torch.save({"state_dict": load_file(sd15_single_file)}, path)
    return path


def test_model_config_loads_a_single_file_checkpoint(tmp_path, sd15_path, sd15_single_file):
    folder = run_one(tmp_path, sd15_path, "folder")
    config = ["--model-config", sd15_path]
    single = run_one(tmp_path, sd15_single_file, "single", *config)
    # the same weights under the original key layout: the same image, up to 8-bit rounding
    assert np.abs(single - folder).max() <= 1 / 255
    # without --model-config diffusers looks for the default config on the hub (offline here)
    source = tmp_path / "content.png"
    result = stylize(source, "-o", tmp_path / "no-config.png", model=sd15_single_file)
    line = one_error(result, 2)
    assert str(sd15_single_file) in line and "could not load" in line


def test_allow_pickle_loads_a_ckpt(tmp_path, sd15_path, sd15_ckpt):
    folder = run_one(tmp_path, sd15_path, "folder")
    ckpt = run_one(tmp_path, sd15_ckpt, "ckpt", "--allow-pickle", "--model-config", sd15_path)
    assert np.abs(ckpt - folder).max() <= 1 / 255  # same weights, same image (8-bit rounding)
    assert read_metadata(tmp_path / "ckpt.png")["model"] == str(sd15_ckpt)


def test_ckpt_without_allow_pickle_is_a_usage_error(tmp_path, sd15_path, sd15_ckpt):
    source = write_image(tmp_path / "a.png", 0)
    out = tmp_path / "out.png"
    result = stylize(source, "-o", out, "--model-config", sd15_path, model=sd15_ckpt)
    line = one_error(result, 2)
    assert str(sd15_ckpt) in line and "--allow-pickle" in line
    assert not out.exists()


# --- LoRA, style, tiny VAE -------------------------------------------------------------------


def run_one(tmp_path: Path, model: Path, name: str, *flags) -> np.ndarray:
    """Stylise the shared 64x64 test image into `name`.png with `flags`; return its pixels."""
    source = tmp_path / "content.png"
    if not source.exists():
        write_image(source, 0)
    out = tmp_path / f"{name}.png"
    result = stylize(source, "-o", out, *flags, model=model, seed=1)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return pixels(out)


def test_lora_changes_the_output_and_scale_zero_does_not(tmp_path, sd15_path, sd15_lora):
    plain = run_one(tmp_path, sd15_path, "plain")
    lora = run_one(tmp_path, sd15_path, "lora", "--lora", sd15_lora)
    zero = run_one(tmp_path, sd15_path, "zero", "--lora", f"{sd15_lora}:0.0")
    assert np.abs(lora - plain).mean() > 1e-3
    assert np.abs(zero - plain).mean() < 1e-6
    # scale 0 is the base model: float noise may flip one 8-bit rounding at most (0 measured)
    assert np.abs(zero - plain).max() <= 1 / 255
    assert read_metadata(tmp_path / "lora.png")["loras"] == [str(sd15_lora)]


def test_style_reference_through_ip_adapter(tmp_path, sd15_path, sd15_ip_adapter):
    ref = write_image(tmp_path / "ref.png", 9)
    style = ["--style", ref, "--ip-adapter", sd15_ip_adapter, "--style-mode", "ipadapter"]
    plain = run_one(tmp_path, sd15_path, "plain")
    styled = run_one(tmp_path, sd15_path, "styled", *style)
    zero = run_one(tmp_path, sd15_path, "zero", *style, "--style-scale", "0")
    assert np.abs(styled - plain).mean() > 1e-3
    assert np.abs(zero - plain).mean() < 1e-6
    # scale 0 is the base model: float noise may flip one 8-bit rounding at most (0 measured)
    assert np.abs(zero - plain).max() <= 1 / 255
    meta = read_metadata(tmp_path / "styled.png")
    assert meta["style"] == [str(ref)] and meta["style_mode"] == "ipadapter"
    assert meta["style_scale"] == 1.0


def test_tiny_vae_from_the_hub_fails_offline_with_one_line(tmp_path, sd15_path):
    source = write_image(tmp_path / "a.png", 0)
    line = one_error(stylize(source, "-o", tmp_path / "out", "--tiny-vae", model=sd15_path), 2)
    assert "madebyollin/taesd" in line and "local folder" in line


def test_tiny_vae_decodes_the_output(tmp_path, sd15_path, tiny_vae_path, monkeypatch):
    """`--tiny-vae` is a switch (hub TAESD); a local tiny VAE reaches it only through ModelSpec."""
    from diffusers import AutoencoderTiny

    real_load = models.load
    loaded = []

    def load_local_taesd(spec):
        if spec.tiny_vae:
            assert spec.tiny_vae is True  # the CLI can only ask for the hub's TAESD
            spec = replace(spec, tiny_vae=str(tiny_vae_path))
        loaded.append(real_load(spec))
        return loaded[-1]

    monkeypatch.setattr(models, "load", load_local_taesd)
    plain = run_one(tmp_path, sd15_path, "plain")
    tiny_vae = run_one(tmp_path, sd15_path, "tiny", "--tiny-vae")
    assert isinstance(loaded[-1].vae, AutoencoderTiny)
    assert not isinstance(loaded[0].vae, AutoencoderTiny)
    assert tiny_vae.shape == plain.shape == (64, 64, 3)
    assert np.abs(tiny_vae - plain).mean() > 1e-3
    assert read_metadata(tmp_path / "tiny.png")["tiny_vae"] is True


def test_tiny_vae_model_path_is_the_vae_used(tmp_path, sd15_path, tiny_vae_path, monkeypatch):
    """`--tiny-vae-model PATH` (with or without `--tiny-vae`) loads that folder, which encodes and
    decodes the image; the output records which tiny VAE it was."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    real_load, loaded = models.load, []

    def recording_load(spec):
        loaded.append(real_load(spec))
        return loaded[-1]

    monkeypatch.setattr(models, "load", recording_load)
    full = run_one(tmp_path, sd15_path, "full")
    tiny = run_one(tmp_path, sd15_path, "tiny", "--tiny-vae", "--tiny-vae-model", tiny_vae_path)
    implied = run_one(tmp_path, sd15_path, "implied", "--tiny-vae-model", tiny_vae_path)
    assert isinstance(loaded[0].vae, AutoencoderKL)
    assert isinstance(loaded[1].vae, AutoencoderTiny) and isinstance(loaded[2].vae, AutoencoderTiny)
    np.testing.assert_array_equal(implied, tiny)
    reference = AutoencoderTiny.from_pretrained(tiny_vae_path)  # the fixture's weights, not TAESD's
    for name, weight in reference.state_dict().items():
        assert torch.equal(loaded[1].vae.state_dict()[name], weight), name
    assert tiny.shape == full.shape == (64, 64, 3)
    assert np.abs(tiny - full).mean() > 1e-2  # a random tiny VAE gives another image
    meta = read_metadata(tmp_path / "tiny.png")
    assert meta["tiny_vae"] is True and meta["tiny_vae_model"] == str(tiny_vae_path)
    assert read_metadata(tmp_path / "full.png").get("tiny_vae") is None


# --- once per batch --------------------------------------------------------------------------


def counting_loads(monkeypatch) -> list[dict[str, int]]:
    """Wrap `models.load`: each load appends a dict counting forward calls of its modules."""
    real_load = models.load
    loads: list[dict[str, int]] = []

    def load(spec):
        model = real_load(spec)
        counts = {"text_encoder": 0, "image_encoder": 0, "unet": 0}
        for name in counts:
            module = getattr(model.pipe, name)

            def hook(*_, name=name):
                counts[name] += 1

            module.register_forward_hook(hook)
        loads.append(counts)
        return model

    monkeypatch.setattr(models, "load", load)
    return loads


def test_model_and_conditioning_once_per_batch(tmp_path, sd15_path, sd15_ip_adapter, monkeypatch):
    loads = counting_loads(monkeypatch)
    ref = write_image(tmp_path / "ref.png", 9)
    images = [write_image(tmp_path / "in" / f"{i}.png", i) for i in range(3)]
    style = ["--style", ref, "--ip-adapter", sd15_ip_adapter, "--style-mode", "ipadapter"]
    for batch in ([images[0]], images):
        result = stylize(
            *batch,
            "-o",
            tmp_path / f"out{len(batch)}",
            "--batch-size",
            "1",
            *style,
            model=sd15_path,
        )
        assert result.exit_code == 0, (result.stderr, result.exception)
    one, three = loads  # one model load per batch
    assert one["text_encoder"] > 0 and one["image_encoder"] > 0
    assert three["text_encoder"] == one["text_encoder"]
    assert three["image_encoder"] == one["image_encoder"]
    assert three["unet"] > one["unet"]  # the hooks see the work that does scale with images


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_output_never_replaces_a_style_reference(tmp_path, sd15_path, overwrite):
    """`-o ref.png` naming the --style file is a usage error, not a skip nor a replaced file."""
    content, ref = tmp_path / "content.png", tmp_path / "ref.png"
    Image.new("RGB", (64, 64), "red").save(content)
    Image.new("RGB", (64, 64), "blue").save(ref)
    before = ref.read_bytes()
    result = CliRunner().invoke(
        app,
        ["stylize", str(content), "--style", str(ref), "-o", str(ref), "--model", str(sd15_path),
         "--device", "cpu", *overwrite],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "would overwrite --style" in result.output
    assert ref.read_bytes() == before
