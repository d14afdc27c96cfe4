"""benchmarks/bench_gpu.py runs on a CPU with tiny models, so it cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_runs_every_case_on_cpu_tiny(tmp_path, capsys, monkeypatch):
    bench = load_bench(monkeypatch)
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--tiny", "--models", str(tmp_path / "models"), "--json", str(out)]
    rows = bench.main([*argv, "--images", "1", "--seconds", "0.1"])
    want = {(case, side) for case in bench.CASES for side in ("diffusers", "stylekit")}
    assert {(r.case, r.side) for r in rows} == want and len(rows) == len(want)
    assert all(r.images >= 1 and r.per_second > 0 for r in rows)
    assert all(r.ratio and r.ratio > 0 for r in rows if r.side == "stylekit")
    assert all(r.peak_gib is None for r in rows)  # no CUDA: no allocator peak
    printed = capsys.readouterr().out
    assert all(f"| {case} | stylekit |" in printed for case in bench.CASES)  # the table
    assert len(json.loads(out.read_text())) == len(want)
