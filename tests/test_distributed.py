"""Many machines: `--engine ray` on a local Ray instance (2 CPUs, started once for this module)
and `--shard K/N`, end to end through the CLI on tiny random models.

A run through Ray must write what `--engine local` writes, byte for byte: the same chunks of
jobs go through the same model with the same seeds (`runner.Batch.chunk`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.errors import UsageError
from stylekit.media.batch import collect_inputs
from stylekit.shards import in_shard, parse_shard, shard_of

RUNNER = CliRunner()


def write_image(path: Path, seed: int, size: tuple[int, int] = (64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def tiny(model: Path) -> list[str]:
    return [
        *("--model", str(model), "--accelerator", "none", "--dtype", "fp32"),
        *("--device", "cpu", "--steps", "2", "--seed", "7"),
    ]


def cli(*args, model: Path):
    return RUNNER.invoke(app, [*map(str, args), *tiny(model)])


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) by relative path, with its bytes."""
    return {
        Path(folder, name).relative_to(root).as_posix(): Path(folder, name).read_bytes()
        for folder, _, names in os.walk(root)
        for name in names
    }


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture
def photos(tmp_path) -> Path:
    """Seven images in a tree, two sizes interleaved (so chunks hold several UNet batches)."""
    root = tmp_path / "photos"
    for i in range(7):
        size = (64, 64) if i % 3 else (64, 48)
        write_image(root / ("sub" if i % 2 else "") / f"p{i}.png", i, size)
    return root


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module: 2 CPUs, a small object store, no dashboard; the
    engine uses it as it finds it and leaves it running."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


# --- --engine ray ----------------------------------------------------------------------------


def test_ctrl_c_stops_a_local_ray_and_keeps_finished_outputs(tmp_path, sd15_path):
    """Without --ray-address the command starts its own Ray and shuts it down, on Ctrl-C too."""
    root, out = tmp_path / "in", tmp_path / "out"
    for i in range(40):
        write_image(root / f"p{i:02d}.png", i, (96, 96))
    args = ["--engine", "ray", "--workers", "2", "--batch-size", "1", "-q", *tiny(sd15_path)]
    command = [sys.executable, "-m", "stylekit.cli", "stylize", str(root), "-o", str(out), *args]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started, deadline = {}, time.monotonic() + 240
    while run.poll() is None and time.monotonic() < deadline:
        started |= descendants(run.pid)  # Ray's processes, while they are ours to find
        if out.is_dir() and any(out.glob("*.png")):
            break
        time.sleep(0.05)
    started |= descendants(run.pid)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "interrupted" in stderr
    kept = files_under(out)
    assert 0 < len(kept) < 40 and all(name.endswith(".png") for name in kept)  # no .part
    for name in kept:
        assert Image.open(out / name).size == (96, 96)  # whole images
    assert any(b"raylet" in cmd for cmd in started.values())  # a local Ray was started
    time.sleep(5)
    alive = {pid for pid, (_, cmd) in processes().items() if started.get(pid) == cmd}
    assert not alive, [started[pid] for pid in alive]  # and stopped, workers included


def test_ray_writes_what_local_writes_fails_what_fails_and_a_rerun_skips_everything(
    photos, tmp_path, sd15_path, ray_instance
):
    (photos / "sub" / "broken.png").write_text("not an image\n")
    local, distributed = tmp_path / "local", tmp_path / "ray"
    result = cli("stylize", photos, "-o", local, "-q", model=sd15_path)
    assert result.exit_code == 1, result.stderr
    ray = ["--engine", "ray", "--workers", "2"]
    result = cli("stylize", photos, "-o", distributed, "--json", *ray, model=sd15_path)
    assert result.exit_code == 1, result.stderr  # one input failed, the rest were done
    assert "7 done, 0 skipped, 1 failed" in result.stderr
    written = files_under(distributed)
    assert written == files_under(local)  # byte for byte, nothing else (no .part files)
    status = {Path(r["input"]).name: r for r in records(result.stdout)}
    assert status.pop("broken.png")["status"] == "failed"
    assert "broken.png: " in result.stderr  # the failure names its file
    assert sorted(r["seed"] for r in status.values()) == [
        7,
        8,
        9,
        10,
        12,
        13,
        14,
    ]  # sub/broken.png is job 4
    assert {r["status"] for r in status.values()} == {"done"}
    assert sorted(
        Path(r["output"]).relative_to(distributed).as_posix() for r in status.values()
    ) == sorted(written)

    (photos / "sub" / "broken.png").unlink()
    result = cli("stylize", photos, "-o", distributed, "--json", *ray, model=sd15_path)
    assert result.exit_code == 0, result.stderr
    assert [r["status"] for r in records(result.stdout)] == ["skipped"] * 7
    assert "loading" not in result.stderr  # nothing to do: no worker started
    assert files_under(distributed) == written


def test_ray_generates_what_local_generates(tmp_path, sd15_path, ray_instance):
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        args = ("t2i-styled", "a cat", "-n", "3", "--style-mode", "none", "--size", "64x64")
        result = cli(*args, "-o", out, "--json", "--engine", engine, model=sd15_path)
        assert result.exit_code == 0, result.stderr
        assert sorted((r["input"], r["seed"]) for r in records(result.stdout)) == [
            (None, 7),
            (None, 8),
            (None, 9),
        ]
        outs[engine] = files_under(out)
    assert sorted(outs["ray"]) == ["a-cat-000.png", "a-cat-001.png", "a-cat-002.png"]
    assert outs["ray"] == outs["local"]


def processes() -> dict[int, tuple[int, bytes]]:
    """Every process: pid -> (parent pid, command line), from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            found[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def descendants(root: int) -> dict[int, bytes]:
    """The processes below `root`: pid -> command line."""
    table = processes()

    def below(pid: int) -> bool:
        while pid in table and pid > 1:
            pid = table[pid][0]
            if pid == root:
                return True
        return False

    return {pid: cmd for pid, (_, cmd) in table.items() if below(pid)}


def worker_pids() -> list[int]:
    """This process's Ray Data workers (descendants whose command line names the map actor)."""
    return [pid for pid, cmd in descendants(os.getpid()).items() if b"MapWorker" in cmd]


def test_a_killed_worker_is_replaced_and_every_output_written_once(
    tmp_path, sd15_path, ray_instance
):
    root, out = tmp_path / "in", tmp_path / "out"
    for i in range(24):
        write_image(root / f"p{i:02d}.png", i, (96, 96))
    args = ("--json", "--engine", "ray", "--workers", "2", "--batch-size", "1")
    box = {}
    run = threading.Thread(
        target=lambda: box.update(result=cli("stylize", root, "-o", out, *args, model=sd15_path))
    )
    run.start()
    killed, written_then = None, None
    deadline = time.monotonic() + 120
    while run.is_alive() and killed is None and time.monotonic() < deadline:
        pids = worker_pids()
        written = list(out.glob("*.png")) if out.is_dir() else []
        if written and len(pids) == 2:  # both workers are up and the batch is under way
            killed, written_then = pids[0], len(written)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    run.join(timeout=300)
    result = box["result"]
    assert killed is not None and written_then < 24, "the batch ended before a worker was killed"
    assert result.exit_code == 0, result.stderr
    done = records(result.stdout)
    assert sorted(Path(r["output"]).name for r in done) == [f"p{i:02d}.png" for i in range(24)]
    assert {r["status"] for r in done} == {"done"}
    assert sorted(files_under(out)) == [f"p{i:02d}.png" for i in range(24)]  # no .part left
    for r in done:  # every output is whole, and is the image of its own seed
        assert Image.open(r["output"]).size == (96, 96)


def test_engine_ray_without_ray_names_the_extra(tmp_path, sd15_path, monkeypatch):
    import sys

    write_image(tmp_path / "a.png", 0)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    result = cli(
        "stylize", tmp_path / "a.png", "-o", tmp_path / "o", "--engine", "ray", model=sd15_path
    )
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --engine ray needs Ray: pip install 'stylekit[ray]'"
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--engine", "spark"], "--engine 'spark'; choose local or ray"),
        (["--workers", "2"], "need --engine ray"),
        (["--engine", "ray", "--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_engine_flags_are_one_line_usage_errors(tmp_path, sd15_path, flags, message):
    write_image(tmp_path / "a.png", 0)
    result = cli("stylize", tmp_path / "a.png", "-o", tmp_path / "o", *flags, model=sd15_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# --- --shard K/N -----------------------------------------------------------------------------


def test_shards_add_up_to_the_whole_batch_byte_for_byte(photos, tmp_path, sd15_path):
    whole = tmp_path / "whole"
    # one image per UNet call: each shard batches its own images, and batched results agree
    # only to float rounding
    one = ("--batch-size", "1")
    assert cli("stylize", photos, "-o", whole, "-q", *one, model=sd15_path).exit_code == 0
    parts = []
    for k in (1, 2, 3):
        out = tmp_path / f"shard{k}"
        result = cli(
            "stylize", photos, "-o", out, "--json", "--shard", f"{k}/3", *one, model=sd15_path
        )
        assert result.exit_code == 0, result.stderr
        parts.append(files_under(out) if out.is_dir() else {})
        assert all(r["status"] == "done" for r in records(result.stdout) if result.stdout)
    union = {}
    for part in parts:
        assert not union.keys() & part.keys()  # no two shards write the same output
        union |= part
    assert union == files_under(whole)
    assert sum(1 for part in parts if part) >= 2  # 7 files do split


def test_t2i_shards_split_generated_images(tmp_path, sd15_path):
    names = []
    for k in (1, 2):
        out = tmp_path / f"s{k}"
        result = cli(
            "t2i-styled",
            "a cat",
            "-n",
            "5",
            "-o",
            out,
            "--style-mode",
            "none",
            "--json",
            "--shard",
            f"{k}/2",
            model=sd15_path,
        )
        assert result.exit_code == 0, result.stderr
        names += [Path(r["output"]).name for r in records(result.stdout)]
        assert {r["seed"] for r in records(result.stdout)} == {
            7 + int(Path(r["output"]).stem[-3:]) for r in records(result.stdout)
        }
    assert sorted(names) == [f"a-cat-{i:03d}.png" for i in range(5)]


def test_adding_files_moves_no_file_to_another_shard(tmp_path):
    root = tmp_path / "in"
    for i in range(20):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i}.png").write_bytes(b"")
    before = {
        item.rel.as_posix(): shard_of(item.rel.as_posix(), 4)
        for item in collect_inputs([str(root)])
    }
    for i in range(20, 40):
        (root / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 5}" / f"f{i}.png").write_bytes(b"")
    after = {
        item.rel.as_posix(): shard_of(item.rel.as_posix(), 4)
        for item in collect_inputs([str(root)])
    }
    assert {rel: after[rel] for rel in before} == before
    assert set(after.values()) == {1, 2, 3, 4}


def test_in_shard_partitions_the_jobs():
    from stylekit.media.batch import Job

    jobs = [Job(Path(f"{i}.png"), Path(f"o/{i}.png"), Path(f"{i}.png"), i) for i in range(50)]
    shards = [in_shard(jobs, k, 5) for k in range(1, 6)]
    assert sorted(j.index for s in shards for j in s) == list(range(50))
    assert all(shards)


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "a/b", "3", "1/2/3", "-1/2"])
def test_bad_shards_are_refused(text, tmp_path, sd15_path):
    with pytest.raises(UsageError, match="K/N"):
        parse_shard(text)
    write_image(tmp_path / "a.png", 0)
    result = cli(
        "stylize", tmp_path / "a.png", "-o", tmp_path / "o", "--shard", text, model=sd15_path
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--shard" in lines[0], result.stderr
