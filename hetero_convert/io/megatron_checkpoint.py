"""The Megatron checkpoint directory (torch_dist), as Megatron-LM lays it out and as this project writes it.

  ROOT/latest_checkpointed_iteration.txt   "release" or an iteration number N
  ROOT/release/ or ROOT/iter_000000N/      the iteration folder:
      .metadata, __{rank}_{k}.distcp        torch.distributed.checkpoint (DCP) data and its index
      metadata.json                        megatron's backend record: without it megatron sees no checkpoint
      common.pt                            non-sharded state (a training run's args, iteration, version), up to
                                           megatron-core 0.18; 0.19 keeps it in the DCP data instead, as the
                                           object `common_state/shard_0_1` (megatron/compat.py)
      integrity.json                       optional (megatron-core >= 0.17.1 when asked): sha256 of every file
      hetero_convert.json                  our description (plan, layout, dtype, source record): written by
                                           hf-to-megatron; a training run's checkpoint has none, and its plan
                                           is rebuilt from the args in its common state
      hf/                                  the source's tokenizer files and generation_config.json, kept for
                                           the way back (megatron-core ignores the folder)

`read_plan` accepts both. Writing: data files first (with the common_state object), then the description,
common.pt and metadata.json last (megatron treats the directory as a checkpoint only once metadata.json
exists), then the tracker.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, ConversionError, PlanError
from ..megatron.compat import COMMON_PT, COMMON_STATE, COMMON_STATE_KEY, METADATA_JSON, common_state_source, \
    read_common_state
from ..plan import ModelPlan, load_plan
from .training_args import config_from_args

DESCRIPTION_FILE = "hetero_convert.json"
HF_FILES_DIR = "hf"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
ITERATION_DIR = "release"
DESCRIPTION_FORMAT = "hetero_convert.megatron"
FORMAT_VERSION = 1
MEGATRON_METADATA = METADATA_JSON  # the form every supported megatron-core loads (megatron/compat.py)
# Megatron checkpoint keys that are not model weights (optimizer and RNG state of a training run).
NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine", "chained_")


def is_megatron_checkpoint(path: str | Path) -> bool:
    """A checkpoint root (with the tracker file) or an iteration folder (DCP metadata or megatron's record)."""
    p = Path(path)
    return any((p / f).is_file() for f in (TRACKER_FILE, ".metadata", "metadata.json"))


def iteration_dir(path: str | Path) -> Path:
    """Accept the checkpoint root (with the tracker file) or the iteration folder itself."""
    p = Path(path)
    tracker = p / TRACKER_FILE
    if tracker.is_file():
        with open(tracker, "rb") as f:  # a tracker holds a word or a number: what is past 64 bytes is no tracker
            it = f.read(64).decode("ascii", errors="replace").strip()
        if it == "release":
            candidate = p / it
        else:
            try:
                candidate = p / f"iter_{int(it):07d}"
            except ValueError:
                raise ConversionError(f"{tracker}: holds {it[:40]!r}, neither 'release' nor an iteration "
                                      f"number") from None
        if not candidate.is_dir():
            raise ConversionError(f"{tracker} points to {candidate.name}, which does not exist")
        return candidate
    if (p / ".metadata").is_file() or (p / "metadata.json").is_file():
        return p
    raise ConversionError(f"{p}: neither a Megatron checkpoint root ({TRACKER_FILE}) nor an iteration folder")


def read_description(it_dir: Path) -> dict | None:
    """Our description of the checkpoint, or None when there is none (a training run's checkpoint). Every
    field is type-checked (`description.check_description`); the plan is checked by `read_plan`."""
    from ..config_checks import read_config_file
    from .description import check_description

    path = Path(it_dir) / DESCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        desc = read_config_file(path)  # bounded, a JSON object, no key twice
    except PlanError as e:
        raise CheckpointError(str(e)) from None
    check_description(desc, path)
    return desc


def read_plan(it_dir: str | Path, reader=None, notes: list[str] | None = None) -> ModelPlan:
    """The model's plan: from our description if present (once it agrees with itself and its source record),
    else rebuilt from a training run's saved args (io/training_args.py). `reader`: the folder's DCPReader, if
    open (0.19 keeps the args inside the DCP data); `notes` collects what a conversion summary should say about
    the rebuilt config."""
    from .description import plan_from_description

    it_dir = Path(it_dir)
    desc = read_description(it_dir)
    if desc is not None:
        return plan_from_description(desc, it_dir / DESCRIPTION_FILE)
    state = read_common_state(it_dir, reader)
    args = state.get("args") if state is not None else None
    if args is None:
        raise ConversionError(f"{it_dir}: no {DESCRIPTION_FILE}, and no training run's args in its common state "
                              f"({COMMON_PT}, or megatron-core 0.19's '{COMMON_STATE_KEY}' object): cannot tell "
                              f"which model this is")
    where = common_state_source(it_dir)
    config, found = config_from_args(args, where)
    try:
        plan = load_plan(config)
    except PlanError as e:
        raise ConversionError(f"{where}: the model the training args describe cannot be planned: {e}") from None
    if notes is not None:
        notes.extend(found)
    return plan


def training_args(it_dir: Path, reader=None):
    """A training run's args (an argparse.Namespace), from its common state (common.pt, or megatron-core 0.19's
    `common_state` object), never unpickled with arbitrary globals; None if it has none."""
    state = read_common_state(it_dir, reader)
    return state.get("args") if state is not None else None


def write_description(it_dir: Path, description: dict) -> None:
    (Path(it_dir) / DESCRIPTION_FILE).write_text(json.dumps(description, indent=1))


def common_state(iteration: int = 0) -> dict:
    """The common state this project writes (megatron's own load needs `checkpoint_version`)."""
    return {"iteration": iteration, "checkpoint_version": 3.0}


def write_megatron_files(root: Path, it_dir_name: str = ITERATION_DIR, iteration: int = 0,
                         forms: tuple[str, ...] = (COMMON_PT, COMMON_STATE)) -> None:
    """common.pt (when `forms` has it: see megatron/compat.py COMMON_FORMS; the common_state object is a DCP
    entry, written with the data), metadata.json (last in the folder: it makes the folder a checkpoint) and
    the tracker."""
    import torch

    it_dir = Path(root) / it_dir_name
    if COMMON_PT in forms:
        torch.save(common_state(iteration), it_dir / COMMON_PT)
    (it_dir / "metadata.json").write_text(json.dumps(METADATA_JSON))
    (Path(root) / TRACKER_FILE).write_text(it_dir_name)
