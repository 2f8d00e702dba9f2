"""Write docs/quickstart.md: a new user's first hour, as a transcript of real commands and their real output.

    python docs/quickstart.py [--out docs/quickstart.md] [--workdir DIR]

Every step runs the installed `hetero-convert` (as `python -m hetero_convert.cli`) in an empty working directory
and records the command, its output and its exit code; a step that does not end as the transcript says it
should (a refusal that is not refused, a conversion that fails) stops the script with an error. CI runs it
(tests/test_quickstart.py), so the page cannot drift from what the tool does.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# (what the step shows, the command as a user types it, the exit code it must end with)
STEPS = [
    ("Write the bundled example: a small checkpoint with every layer kind (GQA layers with their own KV-head "
     "counts, linear replacements, removed sub-blocks, a dummy layer) and a real tokenizer.",
     "hetero-convert example tiny-hf", 0),
    ("Look at it: the per-layer table, parameter and KV-cache counts, and whether a layout is possible. Only "
     "config.json is read.",
     "hetero-convert inspect tiny-hf", 0),
    ("Ask for a layout the model cannot be split into: refused before anything is read or written, with every "
     "problem grouped by the layers that have it and the TP sizes that would work.",
     "hetero-convert hf-to-megatron tiny-hf tiny-meg --tp 3", 1),
    ("Convert at a layout that works: a Megatron torch_dist checkpoint chunked as a TP=2 x PP=2 run would "
     "save it.",
     "hetero-convert hf-to-megatron tiny-hf tiny-meg --tp 2 --pp 2", 0),
    ("A Megatron checkpoint is a model too: inspect reads its description.",
     "hetero-convert inspect tiny-meg --tp 2 --pp 2", 0),
    ("Back to HF. The tokenizer travelled with the Megatron checkpoint, so the export has it.",
     "hetero-convert megatron-to-hf tiny-meg tiny-back", 0),
    ("Check the conversion with real text: the HF model and megatron-core's GPTModel (here on CPU, at TP=2 x "
     "PP=2 under torchrun) on the same tokens, judged against an fp64 reference.",
     "printf '%s\\n' 'The capital of France is' 'A list is a mutable sequence' > prompts.txt\n"
     "hetero-convert verify --hf tiny-back --megatron tiny-meg --tp 2 --pp 2 --prompts prompts.txt", 0),
    ("Re-chunk the Megatron checkpoint for another layout without going through HF (before a long training "
     "run, so each rank reads its own bytes).",
     "hetero-convert megatron-to-megatron tiny-meg tiny-meg-tp1pp2 --tp 1 --pp 2", 0),
]


def run_step(command: str, cwd: Path) -> tuple[int, str, float]:
    python_cli = f"{shlex.quote(sys.executable)} -m hetero_convert.cli"
    shell = command.replace("hetero-convert ", python_cli + " ")
    env = {**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t = time.perf_counter()
    proc = subprocess.run(shell, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = (proc.stdout + proc.stderr).rstrip()
    return proc.returncode, out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).with_name("quickstart.md")))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hc-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = ["# Quick start: the first hour", "",
             "A transcript of real commands and their output, written by `python docs/quickstart.py` (CI runs it, "
             "so it stays true). Install first (README), then, in an empty directory:", ""]
    total = 0.0
    for k, (what, command, want) in enumerate(STEPS, 1):
        rc, out, secs = run_step(command, work)
        total += secs
        if rc != want:
            raise SystemExit(f"step {k} `{command}` exited {rc}, expected {want}:\n{out[-4000:]}")
        shown = "\n".join(f"$ {c}" for c in command.splitlines())
        lines += [f"## {k}. {what}", "", "```console", shown, out, "```", "",
                  f"(exit code {rc}, {secs:.0f} s)", ""]
    lines += [f"All steps: {total:.0f} s on {os.cpu_count()} CPU cores, no GPU "
              f"({time.strftime('%Y-%m-%d')}; Python {sys.version.split()[0]})."]
    Path(args.out).write_text("\n".join(lines).replace(str(work), ".") + "\n")
    print(f"wrote {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
