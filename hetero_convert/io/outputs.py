"""What an existing output directory may be for a command to write over it (used by `staging.Staging`).

A command says what it writes (`OutputKind`: a Megatron checkpoint root, a HF checkpoint directory, a prune
output) and from what (its sources). An existing OUT is replaced only if it is an output of that kind that this
tool wrote (our description in a Megatron iteration folder, our mark in every safetensors header) holding
nothing this tool would not write there, and is no source, holds none and lies in none. Everything else (a
thesis, a `.git`, a home directory, the source's parent) is refused with the reason. Nothing here changes
anything on disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import ConversionError


def entries(path: Path) -> list[os.DirEntry]:
    """A directory's entries, by name."""
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _shown(name: str) -> str:
    return repr(name[:80])


def _megatron_root_problem(path: Path) -> str | None:
    """None when `path` is a Megatron checkpoint root as this tool writes one (the tracker file and a `release`
    folder holding our description and only what our writers put there), else why not. A training run's root
    (iteration folders, no description) is no output of ours, however like one it looks."""
    from .megatron_checkpoint import DESCRIPTION_FILE, HF_FILES_DIR, ITERATION_DIR, TRACKER_FILE

    if not (path / TRACKER_FILE).is_file():
        return f"it has no {TRACKER_FILE}, so it is not a Megatron checkpoint root"
    for e in entries(path):
        if (e.name == TRACKER_FILE and e.is_file(follow_symlinks=False)) or \
                (e.name == ITERATION_DIR and e.is_dir(follow_symlinks=False)):
            continue
        run = " (a training run's iteration folder)" if re.fullmatch(r"iter_\d{7,}", e.name) else ""
        return f"it holds {_shown(e.name)}{run}, which hetero-convert does not write in a Megatron checkpoint root"
    it = path / ITERATION_DIR
    if not (it / DESCRIPTION_FILE).is_file():
        return f"its {ITERATION_DIR} folder has no {DESCRIPTION_FILE}, so hetero-convert did not write it"
    inner = _files_problem(it, MEGATRON_FILES + (DESCRIPTION_FILE,), "Megatron iteration folder",
                           {HF_FILES_DIR: _carried_names()})
    return inner and f"its {ITERATION_DIR} folder: {inner}"


# What our writers put in a Megatron iteration folder besides the description (patterns).
MEGATRON_FILES = (".metadata", "__*_*.distcp", "common.pt", "metadata.json")


def _carried_names() -> tuple[str, ...]:
    """What the iteration folder's `hf` folder holds: the source's tokenizer files and generation config."""
    from .hf_checkpoint import GENERATION_CONFIG, TOKENIZER_FILES

    return (*TOKENIZER_FILES, GENERATION_CONFIG)


def _hf_names() -> tuple[str, ...]:
    """What our HF writers put in a checkpoint directory (patterns)."""
    from ..remote_code import remote_code_files
    from .hf_checkpoint import GENERATION_CONFIG, TOKENIZER_FILES
    from .hf_index import INDEX_FILE, SINGLE_FILE

    return ("config.json", GENERATION_CONFIG, SINGLE_FILE, "model-*-of-*.safetensors", INDEX_FILE, *TOKENIZER_FILES,
            *(os.path.basename(p) for p in remote_code_files()))


# What prune adds to a HF checkpoint directory (repeated from pruning/, which io cannot import; a test pins
# them): scores.SCORES_FILE, export.REPORT_FILE, and fits.FITS_DIR, its folder of fitted tensors.
PRUNE_FILES = ("prune_scores.json", "pruning_report.json")
PRUNE_FOLDERS = {"prune_fits": ("layer-*.safetensors", "layer-*.tmp", "fits.json")}


def _files_problem(path: Path, allowed: Iterable[str], what: str, folders: dict | None = None) -> str | None:
    """None when `path` holds only files matching `allowed`, and folders of `folders` holding only files
    matching theirs."""
    allowed, folders = tuple(allowed), folders or {}
    for e in entries(path):
        if e.is_dir(follow_symlinks=False):
            if e.name not in folders:
                return f"it holds the folder {_shown(e.name)}, which a {what} never holds"
            inner = _files_problem(Path(e.path), folders[e.name], f"{what}'s {e.name} folder")
            if inner:
                return inner.replace("it holds", f"its {e.name} folder holds", 1)
        elif not e.is_file(follow_symlinks=False) or not any(fnmatchcase(e.name, p) for p in allowed):
            return f"it holds {_shown(e.name)}, which hetero-convert does not write in a {what}"
    return None


def _hf_problem(path: Path, extra: tuple[str, ...] = (), folders: dict | None = None) -> str | None:
    """None when `path` is a HF checkpoint directory holding only what our writers put there, its weights
    written by them (every safetensors file carries `WRITER_METADATA`), else why not. The names alone would
    let a checkpoint downloaded from the Hub pass for one of ours."""
    from .hf_index import INDEX_FILE, WRITER_METADATA, read_header

    if not (path / "config.json").is_file() or not ((path / INDEX_FILE).is_file() or any(path.glob("*.safetensors"))):
        return "it has no config.json and safetensors weights, so it is not a HF checkpoint directory"
    why = _files_problem(path, _hf_names() + extra, "HF checkpoint directory", folders)
    if why:
        return why
    for e in entries(path):
        if not e.name.endswith(".safetensors"):
            continue
        try:
            meta = read_header(Path(e.path))[0].get("__metadata__")
        except (OSError, ValueError):  # CheckpointError is one
            meta = None
        if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in WRITER_METADATA.items()):
            return (f"its {_shown(e.name)} was not written by hetero-convert (no {WRITER_METADATA['written_by']} "
                    f"mark in its header: another tool's, or an output of a version before 2026-12-01)")
    return None


def _prune_problem(path: Path) -> str | None:
    names = {e.name for e in entries(path)}
    if not names & (set(PRUNE_FILES) | set(PRUNE_FOLDERS)):
        return (f"it holds none of {', '.join(PRUNE_FILES + tuple(PRUNE_FOLDERS))}, so it is not a prune "
                f"output")
    if names <= set(PRUNE_FILES) | set(PRUNE_FOLDERS):  # scores and fits of a run whose export did not happen
        return _files_problem(path, PRUNE_FILES, "prune output", PRUNE_FOLDERS)
    return _hf_problem(path, PRUNE_FILES, PRUNE_FOLDERS)


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, and so what an existing OUT must be for that command to replace it.
    `rerun_in_place`: an output of this kind may be written again without --overwrite (prune reads its own
    scores from OUT when asked to reuse them)."""

    name: str
    problem: Callable[[Path], str | None]  # None when the directory is one, else why not
    rerun_in_place: bool = False

    def __str__(self) -> str:
        return self.name


MEGATRON = OutputKind("Megatron checkpoint root", _megatron_root_problem)
HF = OutputKind("HF checkpoint directory", _hf_problem)
PRUNE = OutputKind("prune output", _prune_problem, rerun_in_place=True)
# Without a kind (callers written before kinds existed): any of them, never anything else.
ANY = OutputKind("hetero-convert output",
                 lambda p: None if any(k.problem(p) is None for k in (MEGATRON, HF, PRUNE)) else
                 "it is none of what hetero-convert writes (a Megatron checkpoint root, a HF checkpoint "
                 "directory, a prune output)")


def _relation(out: Path, source: Path) -> str | None:
    o, s = out.resolve(), source.resolve()
    if o == s or (o.exists() and s.exists() and os.path.samefile(o, s)):
        return f"it is the source {source}"
    if o in s.parents:
        return f"it contains the source {source}"
    if s in o.parents:
        return f"it lies inside the source {source}"
    return None


def check_place(out: Path, sources: Iterable[str | Path | None] = ()) -> None:
    """The part of `check_output` that looks at no content: OUT is no symbolic link, and, if it exists, no
    source, holding none and lying in none. (A new OUT may be made anywhere, even inside a source's folder:
    that changes nothing that exists.)"""
    if not os.path.lexists(out):
        return
    for src in sources:
        if src is not None:
            why = _relation(out, Path(src))
            if why:
                raise ConversionError(f"{out}: refused as the output: {why} (write the output elsewhere)")
    if out.is_symlink():
        raise ConversionError(f"{out}: refused as the output: it is a symbolic link (give the directory itself)")


def check_output(out: str | Path, kind: OutputKind = ANY, overwrite: bool = False,
                 sources: Iterable[str | Path | None] = ()) -> None:
    """Raise ConversionError unless `out` may be written by a command that writes `kind` from `sources`: if it
    exists it must not be a source, contain one or lie inside one, and must be a directory, and one that is
    empty, or (with `overwrite`, or for a kind that reruns in place) an output of `kind` holding only what
    this tool writes there. Changes nothing."""
    out = Path(out)
    check_place(out, sources)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a directory")
    try:
        empty = not entries(out)
    except OSError as e:
        raise ConversionError(f"{out}: cannot be listed ({e.strerror or e})") from None
    if empty:
        return
    why = kind.problem(out)
    if why is None and (overwrite or kind.rerun_in_place):
        return
    if overwrite:
        raise ConversionError(f"{out}: --overwrite refused: {why}; only a {kind} that hetero-convert wrote is "
                              f"replaced, so it is left as it is")
    if why is None:
        raise ConversionError(f"{out}: exists and is not empty (it holds a previous {kind}: --overwrite replaces it)")
    raise ConversionError(f"{out}: exists and is not empty, and --overwrite would not replace it either: {why}")
