"""Errors as a hostile but ordinary user meets them, through the CLI on tiny models.

Each test is one way a run went wrong before: a job too big to fit, symlink loops, a folder at an
output path, an output folder inside the input folder, exit codes of setup errors, tracebacks,
and load errors that blamed the network for a weight of the wrong shape.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.engine import memory, models
from stylekit.errors import StylekitError

RUNNER = CliRunner()
GIB = 2**30


# --- helpers ---------------------------------------------------------------------------------


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def tiny(model: Path) -> list[str]:
    """Flags that run a tiny local model on the CPU, two steps, no CFG, fixed seed."""
    return [
        *("--model", str(model), "--accelerator", "none", "--cfg", "1"),
        *("--dtype", "fp32", "--device", "cpu", "--steps", "2", "--seed", "1", "-q"),
    ]


def cli(*args, debug: bool = False):
    """`stylekit [--debug] ARGS` in-process; click's Result (stdout and stderr apart)."""
    return RUNNER.invoke(app, [*(["--debug"] if debug else []), *map(str, args)])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(result, code: int) -> str:
    """Assert exit `code`, exactly one `error:` line and no traceback; return the line."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def files_under(root: Path) -> list[str]:
    return sorted(
        Path(folder, name).relative_to(root).as_posix()
        for folder, _, names in os.walk(root)
        for name in names
    )


@pytest.fixture
def no_load(monkeypatch):
    """Make any model load fail the test: setup errors must come before it."""

    def load(spec):
        raise AssertionError(f"a model was loaded: {spec.model}")

    monkeypatch.setattr(models, "load", load)


@pytest.fixture
def free_16gib(monkeypatch):
    """16 GiB free on every device, whatever this machine has: the size check's verdicts below do
    not depend on the machine running the tests."""
    monkeypatch.setattr(memory, "available", lambda device: 16 * GIB)


# --- 1. a bound on the size of a job ---------------------------------------------------------


def size_command(name: str, tmp_path: Path, model: Path, size: str) -> list:
    """`stylize`, `t2i-styled` or `texture-expand` at `--size size` into tmp_path/out."""
    image = write_image(tmp_path / "in.png")
    out = ["-o", tmp_path / "out", *tiny(model)]
    if name == "stylize":
        return ["stylize", image, "--size", size, *out]
    if name == "t2i-styled":
        return ["t2i-styled", "a lighthouse", "--style", image, "--size", size, *out]
    return ["texture-expand", image, "--size", size, "--ad-iters", "1", *out]


@pytest.mark.parametrize("command", ["stylize", "t2i-styled", "texture-expand"])
def test_an_impossible_size_is_refused_before_any_model_loads(
    command, tmp_path, sd15_path, no_load, free_16gib
):
    result = cli(*size_command(command, tmp_path, sd15_path, "100000x100000"))
    line = one_error(result, 2)
    assert "100000x100000" in line and "needs about" in line and "iB (" in line
    assert "16 GiB free" in line and "--no-size-check" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["stylize", "t2i-styled", "texture-expand"])
def test_no_size_check_lets_the_job_through_to_the_model(
    command, tmp_path, sd15_path, no_load, free_16gib, monkeypatch
):
    def load(spec):
        raise StylekitError("reached the model load")

    monkeypatch.setattr(models, "load", load)
    args = size_command(command, tmp_path, sd15_path, "100000x100000")
    line = one_error(cli(*args, "--no-size-check"), 2)
    assert "reached the model load" in line


@pytest.mark.parametrize("command", ["stylize", "t2i-styled", "texture-expand"])
def test_a_size_that_fits_runs(command, tmp_path, sd15_path, free_16gib):
    result = cli(*size_command(command, tmp_path, sd15_path, "64x64"), "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert [r["status"] for r in records(result.stdout)] == ["done"]


def test_an_8192_png_fails_alone_and_the_rest_are_done(tmp_path, sd15_path, free_16gib):
    """A valid 8192² PNG of a few dozen KB (under Pillow's bomb limit) run at its own size
    (`--max-pixels 0`; by default it is shrunk to the model's budget) fails with one line before
    the UNet sees it; the small image next to it is done."""
    big = tmp_path / "in" / "big.png"
    big.parent.mkdir(parents=True)
    Image.new("L", (8192, 8192), 128).save(big, optimize=True)
    assert big.stat().st_size < 100_000
    write_image(tmp_path / "in" / "small.png")
    args = ["stylize", tmp_path / "in", "-o", tmp_path / "out", "--json", "--max-pixels", "0"]
    result = cli(*args, *tiny(sd15_path))
    assert result.exit_code == 1, (result.stderr, result.exception)
    status = {Path(r["input"]).name: r for r in records(result.stdout)}
    assert status["small.png"]["status"] == "done"
    error = status["big.png"]["error"]
    assert status["big.png"]["status"] == "failed"
    assert "8192x8192" in error and "needs about" in error and "--max-pixels" in error
    assert "Traceback" not in result.stderr
    assert files_under(tmp_path / "out") == ["small.png"]


def test_an_inpaint_crop_too_big_fails_alone(tmp_path, sd15_path, free_16gib):
    """Inpainting runs the mask's crop: at its own size (`--max-pixels 0`) an 8192² one cannot."""
    big = tmp_path / "in" / "big.png"
    big.parent.mkdir(parents=True)
    Image.new("L", (8192, 8192), 128).save(big, optimize=True)
    write_image(tmp_path / "in" / "small.png")
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)  # resized to each image: all of it is repainted
    args = ["inpaint", tmp_path / "in", "--mask", mask, "--mask-blur", "0", "--max-pixels", "0"]
    result = cli(*args, "-o", tmp_path / "out", "--json", *tiny(sd15_path))
    assert result.exit_code == 1, (result.stderr, result.exception)
    status = {Path(r["input"]).name: r for r in records(result.stdout)}
    assert status["small.png"]["status"] == "done"
    assert status["big.png"]["status"] == "failed"
    assert "crop at 8192x8192" in status["big.png"]["error"]
    assert "needs about" in status["big.png"]["error"]


# --- 2. symlink loops ------------------------------------------------------------------------


def test_globs_and_folders_through_links_to_dot_and_dotdot_end(tmp_path):
    """`**` through `self -> .` and `sub/up -> ..` once hung with growing memory: in a fresh
    process, under a time limit, each file is found once."""
    root = tmp_path / "in"
    write_image(root / "a.png")
    write_image(root / "sub" / "b.png", 1)
    (root / "self").symlink_to(".")
    (root / "sub" / "up").symlink_to("..")
    code = (
        "from stylekit.media.batch import collect_inputs\n"
        "import sys\n"
        "for spec in sys.argv[1:]:\n"
        "    print(sorted(i.rel.as_posix() for i in collect_inputs([spec])))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "in/**/*.png", "in", "in/**"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['a.png', 'sub/b.png']"] * 3


def test_glob_through_a_link_loop_on_the_command_line(tmp_path, monkeypatch):
    root = tmp_path / "in"
    write_image(root / "a.png")
    write_image(root / "sub" / "b.png", 1)
    (root / "sub" / "up").symlink_to("..")
    monkeypatch.chdir(tmp_path)
    result = cli("stylize", "in/**/*.png", "--dry-run", "--json", "--seed", "1")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert sorted(r["input"] for r in records(result.stdout)) == ["in/a.png", "in/sub/b.png"]


def test_a_looping_file_link_fails_alone(tmp_path, sd15_path):
    root = tmp_path / "in"
    write_image(root / "a.png")
    (root / "loop.png").symlink_to("loop.png")
    (root / "ping.png").symlink_to("pong.png")
    (root / "pong.png").symlink_to("ping.png")
    result = cli("stylize", root, "-o", tmp_path / "out", "--json", *tiny(sd15_path))
    assert result.exit_code == 1, (result.stderr, result.exception)
    status = {Path(r["input"]).name: (r["status"], r["error"]) for r in records(result.stdout)}
    assert status["a.png"] == ("done", None)
    for name in ("loop.png", "ping.png", "pong.png"):
        assert status[name][0] == "failed" and "symbolic link loop" in status[name][1]
    assert "Traceback" not in result.stderr
    assert files_under(tmp_path / "out") == ["a.png"]


def test_a_looping_link_named_on_the_command_line_is_one_line(tmp_path, no_load):
    (tmp_path / "loop.png").symlink_to("loop.png")
    line = one_error(cli("stylize", tmp_path / "loop.png", "--seed", "1"), 2)
    assert "loop.png" in line and "symbolic link loop" in line


# --- 3. only a file is finished work ---------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_at_an_output_path_fails_that_input(tmp_path, sd15_path, overwrite):
    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "b.png", 1)
    out = tmp_path / "out"
    (out / "a.png" / "keep").mkdir(parents=True)  # a folder where a.png's output goes
    result = cli("stylize", tmp_path / "in", "-o", out, "--json", *overwrite, *tiny(sd15_path))
    assert result.exit_code == 1, (result.stderr, result.exception)
    status = {Path(r["input"]).name: r for r in records(result.stdout)}
    assert status["b.png"]["status"] == "done"
    assert status["a.png"]["status"] == "failed"
    assert (
        "is a folder" in status["a.png"]["error"] and str(out / "a.png") in status["a.png"]["error"]
    )
    assert "0 skipped" in result.stderr and "1 failed" in result.stderr
    assert (out / "a.png" / "keep").is_dir()  # left alone


def test_a_fifo_at_an_output_path_fails_that_input(tmp_path, no_load):
    write_image(tmp_path / "in" / "a.png")
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "a.png")
    result = cli("stylize", tmp_path / "in", "-o", tmp_path / "out", "--json", "--seed", "1")
    assert result.exit_code == 1, (result.stderr, result.exception)
    [record] = records(result.stdout)
    assert record["status"] == "failed" and "not a regular file" in record["error"]


# --- 4. an output folder inside the input folder ---------------------------------------------


@pytest.mark.parametrize("spec", ["photos", "photos/**/*.png", "photos/*/*.png"])
def test_an_output_folder_inside_the_input_folder_resumes(tmp_path, sd15_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "photos" / "x" / "a.png")
    write_image(tmp_path / "photos" / "y" / "b.png", 1)
    first = cli("stylize", spec, "-o", "photos/styled", *tiny(sd15_path))
    assert first.exit_code == 0, (first.stderr, first.exception)
    assert "2 done, 0 skipped, 0 failed" in first.stderr
    again = cli("stylize", spec, "-o", "photos/styled", *tiny(sd15_path))
    assert again.exit_code == 0, (again.stderr, again.exception)
    assert "0 done, 2 skipped, 0 failed" in again.stderr
    assert files_under(tmp_path / "photos" / "styled") == ["x/a.png", "y/b.png"]


def test_the_default_output_folder_under_the_input_folder_resumes(tmp_path, sd15_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png")
    assert cli("stylize", ".", *tiny(sd15_path)).exit_code == 0  # writes ./stylized/a.png
    again = cli("stylize", ".", *tiny(sd15_path))
    assert again.exit_code == 0, (again.stderr, again.exception)
    assert "0 done, 1 skipped, 0 failed" in again.stderr


# --- 5. setup errors: exit 2, before the model loads -----------------------------------------


@pytest.fixture
def inputs(tmp_path) -> Path:
    return write_image(tmp_path / "in" / "a.png")


SETUP_ERRORS = {  # name: (extra flags with {tmp} for tmp_path, words the line must contain)
    "style": (["--style", "{tmp}/nope.png"], ["--style", "nope.png", "not found"]),
    "lora": (["--lora", "{tmp}/nope.safetensors"], ["LoRA", "nope.safetensors", "no such file"]),
    "model": (["--model", "{tmp}/no-model"], ["model", "no-model", "no such file"]),
    "ip-adapter": (
        ["--style", "{tmp}/in/a.png", "--style-mode", "ipadapter", "--ip-adapter", "{tmp}/no-ip"],
        ["IP-Adapter", "no-ip", "no such file"],
    ),
    "tiny-vae": (["--tiny-vae-model", "{tmp}/no-vae"], ["tiny VAE", "no-vae", "no such file"]),
}


@pytest.mark.parametrize("name", SETUP_ERRORS)
def test_missing_local_files_are_setup_errors_before_any_load(
    name, tmp_path, sd15_path, inputs, no_load
):
    flags, words = SETUP_ERRORS[name]
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    line = one_error(cli("stylize", inputs, "-o", tmp_path / "out", *tiny(sd15_path), *flags), 2)
    assert all(word in line for word in words), line
    assert not (tmp_path / "out").exists()


def test_a_missing_mask_is_the_same_kind_of_error(tmp_path, sd15_path, inputs, no_load):
    result = cli("inpaint", inputs, "--mask", tmp_path / "nope.png", *tiny(sd15_path))
    assert "--mask" in one_error(result, 2)


def test_a_lora_scale_that_is_not_a_number_is_named(
    tmp_path, sd15_path, sd15_lora, inputs, no_load
):
    line = one_error(
        cli("stylize", inputs, "--lora", f"{sd15_lora}:notanumber", *tiny(sd15_path)), 2
    )
    assert "'notanumber'" in line and "not a number" in line and "no such file" not in line


def test_an_output_path_under_a_file_is_refused_up_front(tmp_path, sd15_path, inputs, no_load):
    (tmp_path / "file.txt").write_text("x")
    line = one_error(
        cli("stylize", inputs, "-o", tmp_path / "file.txt" / "out", *tiny(sd15_path)), 2
    )
    assert "file.txt is a file, not a folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_refused_up_front(tmp_path, sd15_path, inputs, no_load):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        line = one_error(cli("stylize", inputs, "-o", out / "sub", *tiny(sd15_path)), 2)
    finally:
        out.chmod(0o755)
    assert f"folder {out} is not writable" in line and ".part" not in line


def test_a_write_error_names_the_folder_not_the_temp_file(tmp_path, monkeypatch):
    from stylekit.media import batch
    from stylekit.media.images import save_image

    def refuse(path):
        tmp = path.with_name(f".{path.name}.1234abcd.part")
        raise PermissionError(13, "Permission denied", str(tmp))

    monkeypatch.setattr(batch, "_create_temp", refuse)
    with pytest.raises(StylekitError) as info:
        save_image(Image.new("RGB", (8, 8)), tmp_path / "out" / "a.png")
    message = str(info.value)
    assert (
        message
        == f"cannot write {tmp_path / 'out' / 'a.png'}: permission denied (folder {tmp_path / 'out'})"
    )


def test_video_runs_close_every_file(tmp_path, sd15_path):
    """A video run (with audio, so every ffmpeg pass runs) leaves no unclosed file or process
    behind: no ResourceWarning once the garbage is collected."""
    from stylekit.media.video import ffmpeg_exe

    clip = tmp_path / "clip.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=32x32:rate=10",
         "-f", "lavfi", "-t", "0.4", "-i", "sine=frequency=440:sample_rate=44100",
         "-frames:v", "4", "-c:v", "libx264", "-pix_fmt", "yuv444p", "-c:a", "aac", str(clip)],
        check=True,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for extra in ([], ["--frames-out", tmp_path / "frames"]):
            out = [] if extra else ["-o", tmp_path / "out"]
            result = cli("video", clip, *out, *extra, *tiny(sd15_path), "--style-mode", "none")
            assert result.exit_code == 0, (result.stderr, result.exception)
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


# --- 6. failures to start, unexpected errors, --debug ----------------------------------------


def test_a_model_that_fails_to_load_exits_2(tmp_path, sd15_path, inputs):
    broken = tmp_path / "broken-model"
    shutil.copytree(sd15_path, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    result = cli("stylize", inputs, "-o", tmp_path / "out", *tiny(sd15_path), "--model", broken)
    line = one_error(result, 2)
    assert str(broken) in line and "could not load" in line
    assert "failed" not in result.stderr.replace(line, "")  # not "some inputs failed"


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_error_at_start_is_one_line_and_debug_shows_the_traceback(
    tmp_path, sd15_path, inputs, monkeypatch, debug
):
    from stylekit import session

    def broken_open(*args, **kwargs):
        raise ZeroDivisionError("something inside broke")

    monkeypatch.setattr(session, "open_session", broken_open)
    result = cli("stylize", inputs, "-o", tmp_path / "out", *tiny(sd15_path), debug=debug)
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "ZeroDivisionError: something inside broke" in lines[0]
    assert ("Traceback (most recent call last)" in result.stderr) == debug
    assert ("in broken_open" in result.stderr) == debug


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_error_in_one_input_names_it_and_the_batch_goes_on(
    tmp_path, sd15_path, monkeypatch, debug
):
    from stylekit.tasks import stylize as task

    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "b.png", 1)
    real_read = task.read_image

    def read_image(path, **kwargs):
        if Path(path).name == "b.png":
            raise ZeroDivisionError("b is odd")
        return real_read(path, **kwargs)

    monkeypatch.setattr(task, "read_image", read_image)
    result = cli("stylize", tmp_path / "in", "-o", tmp_path / "out", *tiny(sd15_path), debug=debug)
    assert result.exit_code == 1, (result.stderr, result.exception)
    failed = [line for line in result.stderr.splitlines() if "b.png" in line and "failed" in line]
    assert failed and "ZeroDivisionError: b is odd" in failed[0]
    assert ("Traceback (most recent call last)" in result.stderr) == debug
    assert files_under(tmp_path / "out") == ["a.png"]


# --- 7. load errors say what is wrong --------------------------------------------------------


@pytest.fixture
def wide_lora(sd15_lora, tmp_path) -> Path:
    """The tiny SD1.5 LoRA with one layer made for a 48-channel model instead of 32."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(sd15_lora)
    key = next(k for k in sorted(weights) if k.endswith("attn1.to_q.lora.down.weight"))
    rank, width = weights[key].shape
    weights[key] = torch.zeros(rank, width + 16)
    path = tmp_path / "wide" / "lora.safetensors"
    path.parent.mkdir()
    save_file(weights, path)
    return path


def test_a_lora_of_another_width_names_both_shapes(tmp_path, sd15_path, inputs, wide_lora):
    """In a real process, so that all of stderr is seen: diffusers logs the state-dict error in
    full before raising it, and that must not show."""
    args = ["stylize", inputs, "-o", tmp_path / "out", *tiny(sd15_path), "--lora", wide_lora]
    done = subprocess.run(
        [sys.executable, "-m", "stylekit.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()  # one line, nothing else
    assert line.startswith("error: ") and str(wide_lora) in line
    assert "does not fit this sd15 model" in line and "[4, 48]" in line and "[4, 32]" in line
    assert "network" not in line and "Hugging Face cache" not in line


def test_an_sdxl_ip_adapter_in_an_sd15_model_is_not_a_network_problem(
    tmp_path, sd15_path, sdxl_ip_adapter, inputs
):
    style = ["--style", inputs, "--style-mode", "ipadapter", "--ip-adapter", sdxl_ip_adapter]
    line = one_error(cli("stylize", inputs, "-o", tmp_path / "out", *tiny(sd15_path), *style), 2)
    assert "IP-Adapter" in line and "does not fit this sd15 model" in line
    assert "network" not in line and "Hugging Face cache" not in line


def test_an_uncached_hub_model_still_gets_the_offline_hint(tmp_path, inputs):
    args = ["stylize", inputs, "-o", tmp_path / "out", "--model", "nobody-here/not-cached"]
    line = one_error(cli(*args, "--device", "cpu", "--seed", "1"), 2)
    assert "nobody-here/not-cached" in line and "network access" in line


def test_a_closed_stdout_pipe_is_a_quiet_exit(tmp_path):
    """`stylekit presets --json | head -0`: the reader is gone before the first line; no error."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader left: every write to the pipe fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from stylekit.cli import main; main()", "presets", "--json"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert done.returncode == 0
    assert done.stderr == ""
