"""Progress on stderr (rich) and JSON records on stdout, for the CLI's batch commands."""

from __future__ import annotations

import json
import traceback
from dataclasses import asdict

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from stylekit.runner import Events, Record


class ConsoleEvents(Events):
    """Render a batch: an items bar with rate and ETA, a steps bar for the item in progress."""

    def __init__(
        self,
        console: Console,
        *,
        as_json: bool = False,
        quiet: bool = False,
        unit: str = "images",
        debug: bool = False,
    ):
        self.console, self.as_json, self.quiet, self.unit = console, as_json, quiet, unit
        self.debug = debug
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
            transient=False,
            redirect_stdout=False,  # stdout carries the --json records, even in a terminal
        )
        self.items = self.steps = None
        self.notices: set[str] = set()

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def planned(self, total: int, skipped: int) -> None:
        if skipped and not self.quiet:
            self.console.print(f"skipping {skipped} existing output(s); --overwrite to redo them")
        self.items = self.progress.add_task(self.unit, total=total, rate="")

    def loading(self, what: str) -> None:
        if not self.quiet:
            self.console.print(f"loading {escape(what)} …")

    def started(self, job) -> None:
        name = job.input.name if job.input is not None else job.output.name
        if self.steps is None:  # the first item: rate and ETA count from here, not from model load
            total = self.progress.tasks[self.items].total if self.items is not None else None
            if self.items is not None:
                self.progress.reset(self.items, total=total, rate="")
            self.steps = self.progress.add_task("steps", total=1, rate="")
        self.progress.update(self.steps, description=f"  {escape(name)}", completed=0, total=1)

    def step(self, done: int, total: int) -> None:
        if self.steps is not None:
            self.progress.update(self.steps, completed=done, total=total)

    def finished(self, record: Record) -> None:
        if self.as_json:
            print(json.dumps(asdict(record), default=str), flush=True)
        if record.status == "failed":
            self.console.print(
                f"[red]failed[/red] {escape(with_path(record.input or record.output, record.error))}",
                soft_wrap=True,
            )
        if record.status == "planned" and not self.as_json:
            self.console.print(
                f"would write {escape(record.output)}  (from {escape(record.input or '-')}, seed {record.seed})",
                soft_wrap=True,
            )
        if record.status in ("done", "failed") and self.items is not None:
            self.progress.advance(self.items)
            task = self.progress.tasks[self.items]
            if task.elapsed and task.completed:
                self.progress.update(
                    self.items, rate=f"{task.completed / task.elapsed:.2f} {self.unit}/s"
                )

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
