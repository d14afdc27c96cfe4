"""Progress: plain lines when stderr is a log, an ETA that follows a stalled micro-batch, and no
empty steps bar in a terminal."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.media.batch import Job
from stylekit.progress import ConsoleEvents, LogLines, Tracker, line
from stylekit.runner import Record

LINE = re.compile(r"^images (\d+)/(\d+), .*elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d|-:--:--)$")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(name: str, index: int = 0) -> Job:
    return Job(Path("in") / name, Path("out") / name, Path(name), index)


def test_eta_counts_steps_in_flight_and_grows_while_a_micro_batch_stalls():
    clock = FakeClock()
    t = Tracker(8, clock=clock)
    for i in range(4):  # a micro-batch of 4 starts
        t.start(f"o{i}", f"{i}.png")
    assert t.eta() is None and t.current() == "0.png +3"
    clock.now += 10
    t.step(4, 4)  # its steps are over: 4 × 4/5 of an item (decode and save still to come)
    assert t.progress() == 4 * 4 / 5
    assert t.eta() == 10 * (8 - 3.2) / 3.2
    for i in range(4):
        t.finish(f"o{i}")
    clock.now += 2
    assert t.rate() == 4 / 12 and t.eta() == 12.0  # 4 done in 12 s, 4 left
    for i in range(4, 8):
        t.start(f"o{i}", f"{i}.png")
    t.step(1, 4)
    clock.now += 3
    before = t.eta()
    clock.now += 60  # nothing moves for a minute: the ETA must not stay put
    assert t.eta() > before + 30


def test_outputs_refused_before_the_first_start_do_not_count_as_speed():
    clock = FakeClock()
    t = Tracker(3, clock=clock)
    t.finish("blocked")  # failed up front, before any work started
    t.start("a", "a.png")
    clock.now += 5
    t.finish("a")
    assert t.rate() == 1 / 5 and t.eta() == 5.0


def test_log_lines_every_n_items_or_every_few_seconds():
    clock, out = FakeClock(), io.StringIO()
    log = LogLines(Console(file=out, width=40), every_s=10, max_lines=5, clock=clock)  # no wrap
    t = Tracker(20, clock=clock)
    for i in range(20):
        t.start(f"o{i}", f"{i}.png")
        clock.now += 0.5
        t.step(1, 2)
        log.maybe(t, "images", "steps")  # a step: only the first, then once 10 s have passed
        t.finish(f"o{i}")
        log.maybe(t, "images", "steps", finished=True)  # every 20/5 = 4 items, and the last
    lines = out.getvalue().splitlines()
    assert [int(LINE.match(x).group(1)) for x in lines] == [0, 4, 8, 12, 16, 20]
    clock.now += 11  # a slow item: a line after `every_s` seconds even without a finish
    t2 = Tracker(1, clock=clock)
    t2.start("x", "x.png")
    t2.step(3, 8)
    log.maybe(t2, "images", "steps")
    assert out.getvalue().splitlines()[-1].startswith("images 0/1, x.png step 3/8, ")
    assert line(t2, "videos", "frames").startswith("videos 0/1, x.png frame 3/8, ")


def test_terminal_shows_no_steps_bar_before_the_first_step_nor_after_the_last_item():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    events = ConsoleEvents(console)
    with events:
        events.planned(2, 0)
        events.loading("model")
        events.started(job("a.png"))
        assert [t.description for t in events.progress.tasks] == ["images"]
        events.step(1, 2)
        steps = events.progress.tasks[events.steps]
        assert steps.visible and steps.description.strip() == "a.png"
        assert steps.fields["count"] == "1/2"
        events.step(2, 2)
        events.finished(Record("in/a.png", str(Path("out") / "a.png"), "done"))
        assert not events.progress.tasks[events.steps].visible  # nothing in flight
        events.started(job("b.png", 1))
        events.step(1, 2)
        assert events.progress.tasks[events.steps].visible
        events.finished(Record("in/b.png", str(Path("out") / "b.png"), "done"))
    assert not events.progress.tasks[events.steps].visible
    assert events.progress.tasks[events.items].fields["count"] == "2/2"


def test_non_terminal_run_prints_progress_lines_as_it_goes(tmp_path, sd15_path):
    """stderr to a log (CliRunner's is no terminal): plain lines with done/total, rate and ETA,
    one per finished image in a small batch, the first before the last image is done."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    args = ["stylize", str(folder), "-o", str(tmp_path / "out"), "--model", str(sd15_path)]
    args += ["--accelerator", "none", "--device", "cpu", "--dtype", "fp32", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--seed", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("images ")]
    assert lines and all(LINE.match(x) for x in lines), result.stderr
    done = [int(LINE.match(x).group(1)) for x in lines]
    assert {1, 2, 3} <= set(done) and done == sorted(done)
    assert any("s/image" in x or "images/s" in x for x in lines)
    assert any(" +1 step " in x for x in lines)  # the micro-batch of 2 in flight, by name
    assert result.stderr.index(lines[-1]) < result.stderr.index("3 done, 0 skipped, 0 failed")
    quiet = CliRunner().invoke(app, [*args, "--overwrite", "-q"])
    assert quiet.exit_code == 0 and not any(
        x.startswith("images ") for x in quiet.stderr.splitlines()
    )
