"""Output that appears complete or not at all.

Every command writes into a hidden sibling of its output directory and renames it into place only when
everything succeeded; on any failure (an exception, or SIGTERM, which torchrun sends the surviving processes
when one dies) the sibling is deleted. One class serves the single-process and the distributed paths (where
only the coordinator creates, commits and cleans up).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

from ..errors import ConversionError


class Staging:
    """`begin()` checks OUT may be written and creates the hidden sibling; `commit()` renames it into place
    (replacing an old OUT only then); leaving the `with` block by an exception before `commit()` deletes it."""

    def __init__(self, out_dir: str | Path, overwrite: bool, active: bool = True):
        self.out_dir, self.overwrite, self.active = Path(out_dir), overwrite, active
        self.tmp: Path | None = None
        self.committed = False
        self._old_handler = None

    def begin(self) -> Path:
        out = self.out_dir
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not self.overwrite:
            raise ConversionError(f"{out} exists and is not empty (use --overwrite to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self.tmp = tmp
        return tmp

    def commit(self) -> None:
        out = self.out_dir
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            self.tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(out)
        self.committed = True

    def cleanup(self) -> None:
        if self.tmp is not None and not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Staging":
        if self.active and threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise SystemExit(128 + signum)  # unwinds through __exit__, which deletes the staging dir

            self._old_handler = signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.active:
            self.cleanup()
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
