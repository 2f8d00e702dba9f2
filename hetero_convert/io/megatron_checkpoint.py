"""The Megatron checkpoint directory (torch_dist), as Megatron-LM lays it out and as this project writes it.

  ROOT/latest_checkpointed_iteration.txt   "release" or an iteration number N
  ROOT/release/ or ROOT/iter_000000N/      the iteration folder:
      .metadata, __{rank}_{k}.distcp        torch.distributed.checkpoint (DCP) data and its index
      metadata.json                        megatron's backend record: without it megatron sees no checkpoint
      common.pt                            non-sharded state (a training run's args, iteration, version)
      hetero_convert.json                  our description (plan, layout, dtype, source record): written by
                                           hf-to-megatron; a training run's checkpoint has none, and its plan
                                           is rebuilt from the args in its common state
      hf/                                  the source's tokenizer files and generation_config.json, kept for
                                           the way back (megatron-core ignores the folder)

`read_plan` accepts both. Writing: data files first, then the description, common.pt and metadata.json last
(megatron treats the directory as a checkpoint only once metadata.json exists), then the tracker.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, ConversionError, PlanError
from ..plan import ModelPlan, load_plan

DESCRIPTION_FILE = "hetero_convert.json"
HF_FILES_DIR = "hf"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
ITERATION_DIR = "release"
DESCRIPTION_FORMAT = "hetero_convert.megatron"
FORMAT_VERSION = 1
# Exactly what megatron-core 0.16's own save writes; megatron rejects any other key in this file.
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
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
        it = tracker.read_text().strip()
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


def read_plan(it_dir: str | Path) -> ModelPlan:
    """The model's plan: from our description if present (once it agrees with itself and its source record),
    else rebuilt from a training run's saved args."""
    from .description import plan_from_description

    it_dir = Path(it_dir)
    desc = read_description(it_dir)
    if desc is not None:
        return plan_from_description(desc, it_dir / DESCRIPTION_FILE)
    args = training_args(it_dir)
    encoded = getattr(args, "heterogeneous_layers_config_encoded_json", "") if args is not None else ""
    if encoded:
        # Megatron-LM persists the HF config.json it was trained from in its args.
        cfg = json.loads(encoded)
        cfg.setdefault("vocab_size", getattr(args, "vocab_size", None))
        cfg.setdefault("hidden_size", args.hidden_size)
        cfg.setdefault("num_attention_heads", args.num_attention_heads)
        cfg.setdefault("num_hidden_layers", args.num_layers)
        cfg.setdefault("tie_word_embeddings", not getattr(args, "untie_embeddings_and_output_weights", True))
        return load_plan(cfg)
    raise ConversionError(f"{it_dir}: no {DESCRIPTION_FILE} and no heterogeneous config in common.pt args: "
                          f"cannot tell which model this is")


def training_args(it_dir: Path):
    """A training run's args (an argparse.Namespace), from its common state (common.pt, or megatron-core 0.19's
    `common_state` object), never unpickled with arbitrary globals; None if it has none."""
    from .dcp import read_common_state

    state = read_common_state(it_dir)
    return state.get("args") if isinstance(state, dict) else None


def write_description(it_dir: Path, description: dict) -> None:
    (Path(it_dir) / DESCRIPTION_FILE).write_text(json.dumps(description, indent=1))


def write_megatron_files(root: Path, it_dir_name: str = ITERATION_DIR, iteration: int = 0) -> None:
    """common.pt, metadata.json (last in the folder: it makes the folder a checkpoint) and the tracker."""
    import torch

    it_dir = Path(root) / it_dir_name
    torch.save({"iteration": iteration, "checkpoint_version": 3.0}, it_dir / "common.pt")
    (it_dir / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
    (Path(root) / TRACKER_FILE).write_text(it_dir_name)
