"""`make demo` (scripts/demo): the default preset on a CUDA machine, lcm-sd15 without one (SDXL at
1024² takes minutes per image on a CPU), said in one line. Run with stand-ins for the venv's
python (reporting CUDA or not) and stylekit (printing its arguments): no model, no download."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_demo(tmp_path: Path, *, cuda: bool, preset: str | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f"#!/bin/sh\necho {int(cuda)}\n")
    (bin_dir / "stylekit").write_text('#!/bin/sh\necho "stylekit $*"\n')
    for name in ("python", "stylekit"):
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "BIN": str(bin_dir)}
    env.pop("DEMO_PRESET", None)
    if preset:
        env["DEMO_PRESET"] = preset
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(("cuda", "preset"), [(True, "std-sdxl"), (False, "lcm-sd15")])
def test_demo_picks_the_preset_the_machine_can_run(tmp_path, cuda, preset):
    done = run_demo(tmp_path, cuda=cuda)
    assert done.returncode == 0, done.stderr
    args = done.stdout.split()
    assert args[:3] == ["stylekit", "stylize", "examples/content"]
    assert args[args.index("--preset") + 1] == preset
    assert args[args.index("-o") + 1] == f"out/demo/{preset}"
    lines = done.stderr.splitlines()
    if cuda:
        assert lines == []
    else:
        assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "lcm-sd15" in lines[0]


def test_demo_preset_can_be_chosen(tmp_path):
    done = run_demo(tmp_path, cuda=False, preset="sd-turbo")
    assert done.returncode == 0 and done.stderr == ""
    assert "--preset sd-turbo" in done.stdout
