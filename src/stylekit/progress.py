"""Progress on stderr and JSON records on stdout, for the CLI's batch commands.

In a terminal, live bars (rich): the batch, and the item or micro-batch in progress. Anywhere else
(a log file, CI, `nohup`), plain lines instead, one every `LogLines.every_s` seconds or every
`LogLines.every_n`-th item, with done/total, the rate and the ETA. Both read one `Tracker`, whose
ETA counts the steps of the items in flight and keeps growing while nothing moves, so a stalled
micro-batch shows.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
)
from rich.text import Text

from stylekit.runner import Events, Record


class ConsoleEvents(Events):
    """Render a batch: an items bar with rate and ETA, a steps bar for the item in progress
    (in a terminal), or a plain progress line now and then (anywhere else)."""

    def __init__(
        self,
        console: Console,
        *,
        as_json: bool = False,
        quiet: bool = False,
        unit: str = "images",
        step_unit: str = "steps",
        debug: bool = False,
    ):
        self.console, self.as_json, self.quiet, self.unit = console, as_json, quiet, unit
        self.step_unit, self.debug = step_unit, debug
        live = console.is_terminal and not quiet
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[rate]}"),
            ClockColumn("elapsed"),
            TextColumn("ETA"),
            ClockColumn("eta"),
            console=console,
            disable=not live,
            transient=False,
            redirect_stdout=False,  # stdout carries the --json records, even in a terminal
        )
        self.items = self.steps = None
        self.tracker = Tracker(0)
        self.log = LogLines(console) if not live and not quiet else None
        self.notices: set[str] = set()

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def planned(self, total: int, skipped: int) -> None:
        if skipped and not self.quiet:
            self.console.print(f"skipping {skipped} existing output(s); --overwrite to redo them")
        self.tracker = Tracker(total)
        self.items = self.progress.add_task(
            self.unit, total=total, count=f"0/{total}", rate="", **self.tracker.clocks()
        )

    def loading(self, what: str) -> None:
        if not self.quiet:
            self.console.print(f"loading {escape(what)} …")

    def started(self, job) -> None:
        """An item (or one of a micro-batch) begins: rate and ETA count from the first one, not
        from the model load; the steps bar appears with the first step, not empty before it."""
        name = job.input.name if job.input is not None else job.output.name
        if self.tracker.started_at is None and self.items is not None:
            self.progress.reset(self.items)
        self.tracker.start(str(job.output), name)

    def step(self, done: int, total: int) -> None:
        self.tracker.step(done, total)
        if self.items is None:
            return
        t, label = self.tracker, f"  {escape(self.tracker.current())}"
        if self.steps is None:
            self.steps = self.progress.add_task(
                label, total=total, count="", rate="", **t.step_clocks()
            )
        rate = per_second(t.step_rate(), self.step_unit)
        count = f"{done}/{total}"
        self.progress.update(
            self.steps, description=label, completed=done, total=total, count=count, rate=rate
        )
        self.progress.update(self.steps, visible=True)  # hidden between micro-batches
        self.progress.update(self.items, completed=t.progress())
        if self.log is not None:
            self.log.maybe(self.tracker, self.unit, self.step_unit)

    def finished(self, record: Record) -> None:
        if self.as_json:
            print(json.dumps(asdict(record), default=str), flush=True)
        if record.status == "failed":
            self.console.print(
                f"[red]failed[/red] {escape(with_path(record.input or record.output, record.error))}",
                soft_wrap=True,
            )
        if record.status in ("done", "failed") and self.items is not None:
            t = self.tracker
            t.finish(record.output)
            count, rate = f"{t.done}/{t.total}", per_second(t.rate(), self.unit)
            self.progress.update(self.items, completed=t.progress(), count=count, rate=rate)
            if self.steps is not None and not t.in_flight:
                self.progress.update(self.steps, visible=False)  # no stale bar between items
            if self.log is not None and t.started_at is not None:
                self.log.maybe(t, self.unit, self.step_unit, finished=True)

    def error(self, exc: BaseException) -> None:
        if self.debug:
            print_traceback(self.console, exc)

    def warning(self, message: str) -> None:
        self.console.print(f"[yellow]warning[/yellow] {escape(message)}", soft_wrap=True)

    def notice(self, message: str) -> None:
        """Print a notice once per run, however many inputs it concerns."""
        if message not in self.notices and not self.quiet:
            self.console.print(escape(message), soft_wrap=True)
        self.notices.add(message)

    def summary(self, report) -> None:
        style = "red" if report.failed else "green"
        self.console.print(f"[{style}]{report.summary()}[/{style}]")
        for path, reason in report.failed:
            self.console.print(
                f"  [red]✗[/red] {escape(with_path(str(path), reason))}", soft_wrap=True
            )


def with_path(path: str, reason: str | None) -> str:
    """`path: reason`, unless the reason already starts with the path."""
    reason = reason or "failed"
    return reason if reason.startswith(path) else f"{path}: {reason}"


def print_traceback(console: Console, exc: BaseException) -> None:
    """The full traceback of `exc` (its causes included), as Python prints it (--debug)."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    console.print(text, markup=False, highlight=False, soft_wrap=True)


# --- where a batch stands -----------------------------------------------------------------------
@dataclass
class Tracker:
    """Items done, items in flight (a micro-batch shares its steps), timed from the first start.

    Progress counts the in-flight items' step fraction, and the ETA is elapsed × left / progress:
    it grows while nothing moves, instead of holding the estimate of the last item that finished.
    """

    total: int
    clock: Callable[[], float] = time.monotonic
    done: int = 0
    in_flight: dict[str, str] = field(default_factory=dict)  # output → display name
    steps: tuple[int, int] = (0, 0)  # (done, total) of the item or micro-batch in flight
    started_at: float | None = None
    done_at_start: int = 0  # finished before the first start (outputs refused up front)
    batch_started_at: float = 0.0

    def start(self, key: str, name: str) -> None:
        now = self.clock()
        if self.started_at is None:
            self.started_at, self.done_at_start = now, self.done
        if not self.in_flight:
            self.steps, self.batch_started_at = (0, 0), now
        self.in_flight[key] = name

    def step(self, done: int, total: int) -> None:
        self.steps = (done, total)

    def finish(self, key: str) -> None:
        self.in_flight.pop(key, None)
        self.done += 1
        if not self.in_flight:
            self.steps = (0, 0)

    def current(self) -> str:
        """The item in flight, or the first of a micro-batch and how many more."""
        names = list(self.in_flight.values())
        return "" if not names else names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else self.clock() - self.started_at

    def progress(self) -> float:
        """Items done plus the in-flight ones' share of their steps; decoding and saving count as
        one step more, so a micro-batch whose steps are over is not taken for done."""
        done, total = self.steps
        return self.done + len(self.in_flight) * done / (total + 1)

    def rate(self) -> float | None:
        """Items per second since the first start."""
        made, elapsed = self.done - self.done_at_start, self.elapsed()
        return made / elapsed if made > 0 and elapsed > 0 else None

    def eta(self) -> float | None:
        made = self.progress() - self.done_at_start
        if made <= 0 or self.started_at is None:
            return None
        return self.elapsed() * (self.total - self.progress()) / made

    def clocks(self) -> dict[str, Callable[[], float | None]]:
        """The batch's elapsed time and ETA, for `ClockColumn`s."""
        return {"elapsed": self.elapsed, "eta": self.eta}

    def step_clocks(self) -> dict[str, Callable[[], float | None]]:
        """The item (or micro-batch) in flight: its elapsed time and ETA."""
        return {"elapsed": lambda: self.clock() - self.batch_started_at, "eta": self.step_eta}

    def step_rate(self) -> float | None:
        done, seconds = self.steps[0], self.clock() - self.batch_started_at
        return done / seconds if done and seconds > 0 else None

    def step_eta(self) -> float | None:
        done, total = self.steps
        if not done or not self.in_flight:
            return None
        return (self.clock() - self.batch_started_at) * (total - done) / done


def per_second(rate: float | None, unit: str) -> str:
    """`2.50 images/s`, or `12.3 s/image` when slower than one a second; "" when unknown."""
    if not rate:
        return ""
    return f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit.removesuffix('s')}"


def clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = max(0, math.ceil(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ClockColumn(ProgressColumn):
    """A time from the task's `name` field (a callable), recomputed at every refresh, so an ETA
    keeps moving while no step arrives."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def render(self, task) -> Text:
        value = task.fields.get(self.name)
        style = "progress.remaining" if self.name == "eta" else "progress.elapsed"
        return Text(clock_text(value() if value else None), style=style)


@dataclass
class LogLines:
    """Plain progress lines for a log (stderr not a terminal): one when an item finishes and
    `every_n` items or `every_s` seconds have gone by since the last, the last item included;
    one during an item once `every_s` seconds pass (a slow model on a CPU)."""

    console: Console
    every_s: float = (
        10.0  # a line every 10 s at most: readable in CI logs, quiet for hours-long runs
    )
    max_lines: int = 20  # …or every total/20 items (every item of a small batch)
    clock: Callable[[], float] = time.monotonic
    last_at: float | None = None
    last_done: int = 0

    def maybe(self, t: Tracker, unit: str, step_unit: str, *, finished: bool = False) -> None:
        now = self.clock()
        every_n = max(1, math.ceil(t.total / self.max_lines))
        due = self.last_at is None or now - self.last_at >= self.every_s
        if finished:
            due = due or t.done - self.last_done >= every_n or t.done == t.total
        if due:
            self.console.print(
                line(t, unit, step_unit), markup=False, highlight=False, soft_wrap=True
            )
            self.last_at, self.last_done = now, t.done


def line(t: Tracker, unit: str, step_unit: str) -> str:
    """`images 3/8, b.png +1 step 2/4, 0.45 images/s, elapsed 0:00:07, ETA 0:00:09`."""
    parts = [f"{unit} {t.done}/{t.total}"]
    if t.in_flight and t.steps[1]:
        parts.append(f"{t.current()} {step_unit.removesuffix('s')} {t.steps[0]}/{t.steps[1]}")
    if t.rate():
        parts.append(per_second(t.rate(), unit))
    parts += [f"elapsed {clock_text(t.elapsed())}", f"ETA {clock_text(t.eta())}"]
    return ", ".join(parts)
