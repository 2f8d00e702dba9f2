"""Progress display on a terminal (stderr); silent when stderr is not one, so logs and pipes stay clean."""

from __future__ import annotations

import sys

from .render import err


class Progress:
    """A bytes/s progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress as P, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.p = P("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(), console=err)
            self.task = self.p.add_task(label, total=total)

    def __enter__(self):
        if self.enabled:
            self.p.start()
        return self

    def set_total(self, total: int) -> None:
        if self.enabled:
            self.p.update(self.task, total=total)

    def __call__(self, n: int):
        if self.enabled:
            self.p.advance(self.task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.stop()
