"""docs/quickstart.md is what the tool does: the script that writes it runs every step of a new user's first
hour (each must end with the exit code the page shows), and the committed page shows exactly those commands."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def commands(page: str) -> list[str]:
    return re.findall(r"^\$ (.*)$", page, flags=re.M)


def test_quickstart_transcript_runs_and_matches_the_page(tmp_path):
    out = tmp_path / "quickstart.md"
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "quickstart.py"), "--out", str(out), "--workdir",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fresh = out.read_text()
    committed = (REPO / "docs" / "quickstart.md").read_text()
    assert commands(fresh) == commands(committed) and len(commands(fresh)) >= 9
    assert "Traceback" not in fresh
    assert "PASS" in fresh and "is not possible" in fresh
