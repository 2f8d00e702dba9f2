"""What `prune` tells the user while it runs: one overall bar with an ETA on a terminal, one line per step
with elapsed and remaining time otherwise (nohup, a scheduler's log, a pipe), nothing with --quiet.

The work of a run is known before it starts (how many layers, variants and tokens), so the pipeline
announces it up front as abstract work units (roughly FLOPs) and then reports the units each step has done.
The remaining time is the elapsed time scaled by the work still to do, which stays honest when the steps
differ in cost (late layers of the scoring sweep carry every earlier layer's variants, and cost more).
"""

from __future__ import annotations

import sys
import time


def fmt_seconds(s: float) -> str:
    s = max(0, round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """The silent reporter, and the interface the pipeline calls.

    plan(total, title)   the whole run's work, in units; may be called again when the plan changes
    step(units, note)    `units` more are done; `note` names what just finished ("layer 7/30 scored")
    warn(message)        something the user must read even in a log (a shorter calibration text, ...)
    """

    def __init__(self):
        self.total = 0.0
        self.done = 0.0
        self.t0 = time.monotonic()
        self.warnings: list[str] = []

    def plan(self, total: float, title: str = "prune") -> None:
        self.total = float(total)
        self.title = title

    def step(self, units: float, note: str = "") -> None:
        self.done = min(self.total, self.done + units) if self.total else self.done + units

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float | None:
        if not self.done or not self.total:
            return None
        return self.elapsed() * (self.total - self.done) / self.done

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LineProgress(Progress):
    """One line per step, flushed at once: readable in a log file, no control characters."""

    def __init__(self, stream=None, min_interval: float = 0.0):
        super().__init__()
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._last = -1e9

    def step(self, units: float, note: str = "") -> None:
        super().step(units, note)
        now = time.monotonic()
        if not note or now - self._last < self.min_interval:
            return
        self._last = now
        left = self.remaining()
        pct = 100.0 * self.done / self.total if self.total else 0.0
        rest = f", ~{fmt_seconds(left)} left" if left is not None and self.done < self.total else ""
        print(f"[prune {pct:5.1f}%] {note} ({fmt_seconds(self.elapsed())} elapsed{rest})", file=self.stream,
              flush=True)

    def warn(self, message: str) -> None:
        super().warn(message)
        print(f"[prune] warning: {message}", file=self.stream, flush=True)


class BarProgress(Progress):
    """A single rich bar for the whole run (percentage, elapsed, remaining) with the last step's note."""

    def __init__(self, console):
        super().__init__()
        from rich.progress import (
            BarColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress

        self.console = console
        self.bar = RichProgress(TextColumn("[bold]{task.fields[title]}"), BarColumn(), TaskProgressColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                                TextColumn("{task.description}"), console=console, transient=True)
        self.task = None
        self.bar.start()

    def plan(self, total: float, title: str = "prune") -> None:
        super().plan(total, title)
        if self.task is None:
            self.task = self.bar.add_task("", total=self.total, title=title, eta="")
        else:
            self.bar.update(self.task, total=self.total, title=title)

    def step(self, units: float, note: str = "") -> None:
        super().step(units, note)
        left = self.remaining()
        eta = f"~{fmt_seconds(left)} left" if left is not None and self.done < self.total else ""
        if self.task is not None:
            self.bar.update(self.task, completed=self.done, description=note, eta=eta)

    def warn(self, message: str) -> None:
        super().warn(message)
        self.console.print(f"[yellow]warning:[/] {message}", highlight=False)

    def close(self) -> None:
        self.bar.stop()


def make_progress(quiet: bool, console=None) -> Progress:
    """The reporter for a CLI run: silent with --quiet (warnings are still kept for the report), a bar when
    stderr is a terminal, else one line per step on stderr."""
    if quiet:
        return Progress()
    stream = getattr(console, "file", None) or sys.stderr
    if console is not None and stream.isatty():
        return BarProgress(console)
    return LineProgress(stream)
