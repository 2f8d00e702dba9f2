"""Data that ships with the package: the mapping tables and the bundled fixtures.

In a source tree they live at the top of the repo (mappings/, fixtures/); the wheel carries them inside the
package as _mappings/ and _fixtures/ (pyproject's force-include)."""

from __future__ import annotations

from pathlib import Path


def shipped_dir(name: str, marker: str) -> Path:
    """The folder `name` (installed as `_name`), recognised by the file `marker` inside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here / f"_{name}", here.parent / name):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(f"{name}/{marker} not found next to the package")
