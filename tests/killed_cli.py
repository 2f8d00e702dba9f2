"""Test-only entry point: the CLI, stopping at a named point of publishing its output until the test kills it
(or lets it go on), to show what `kill -9` there leaves and that the next run cleans it up.

HC_PAUSES  comma-separated points to stop at:
           ready            `Staging.begin` called, before the output lock is taken
           begun            the staging folder exists and the output lock is held
           commit           the output is complete in the staging folder, not yet published
           between-renames  --overwrite: the previous output renamed aside, the new one not yet in place
           published        the new output in place; with --overwrite the previous one not yet deleted
HC_DIR     at a point P the run creates HC_DIR/P, then waits until HC_DIR/P.go exists (or it is killed)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hetero_convert.io import staging


def pause(point: str) -> None:
    if point not in os.environ.get("HC_PAUSES", "").split(","):
        return
    here = Path(os.environ["HC_DIR"])
    (here / point).write_text(str(os.getpid()))
    while not (here / f"{point}.go").exists():
        time.sleep(0.02)


_begin, _commit, _rename = staging.Staging.begin, staging.Staging.commit, staging.rename_noreplace


def begin(self):
    pause("ready")
    tmp = _begin(self)
    pause("begun")
    return tmp


def commit(self):
    pause("commit")
    _commit(self)
    if not os.path.lexists(self.out_dir.parent / f".{self.out_dir.name}.partial-{staging.Owner.me().tag()}"):
        pause("published")  # (a plain publish; with --overwrite, `rename` below paused before the deletion)


def rename(src, dst):
    _rename(src, dst)
    if ".old-" in Path(dst).name:
        pause("between-renames")
    elif ".partial-" in Path(src).name and any(".old-" in p.name for p in Path(dst).parent.iterdir()):
        pause("published")


staging.Staging.begin, staging.Staging.commit, staging.rename_noreplace = begin, commit, rename

if __name__ == "__main__":
    from hetero_convert.cli import app

    app(prog_name="hetero-convert")
