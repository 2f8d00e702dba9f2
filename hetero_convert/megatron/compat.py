"""Everything that differs between the megatron-core versions this project supports, in one place.

Tested range: megatron-core 0.16.1 .. 0.19.x (`SUPPORTED`, as pyproject.toml declares it). What differs, and
how each is handled here (branching on the *form* of what megatron gives us, never on its version number,
except where a file we write has to suit a version that is not installed):

- Layer specs. 0.16 and 0.17 give every submodule of a layer as a `ModuleSpec`; from 0.18 on the MLP is a
  `functools.partial` (of `MLP.as_mlp_submodule`, a classmethod bound to MLP, or of the gathered linear class)
  and a no-op MLP is the bare `IdentityOp` class. `module_class`, `submodules` and `describe` read all forms.
- Transformer Engine. Both versions decide it in `megatron.core.extensions.transformer_engine.HAVE_TE`
  (stricter than `import transformer_engine` succeeding); `te_available` asks that flag.
- Common (non-sharded) state: a run's `args`, `iteration`, `checkpoint_version`. Up to 0.18 it is the file
  `common.pt`, and a folder without it does not load. 0.19 writes no `common.pt`: the state is a DCP object
  `common_state/shard_0_1` holding `torch.save([state])`; 0.19 still reads (and prefers) a `common.pt`.
  `read_common_state` reads either, through the project's one restricted unpickler (io/safe_pickle);
  `COMMON_FORMS` says which forms hf-to-megatron writes for a `--megatron-core` target.
- metadata.json. 0.16 builds its config from the file's keys (an unknown key is an error) and writes four;
  0.19 writes two and ignores unknown ones. The four-key form (`METADATA_JSON`) loads in every version.
- Integrity manifest (`integrity.json`, 0.17.1 on, written when a save asks for it): sha256 of every file of
  the folder. `read_integrity_manifest` reads and checks it; convert/driver.py verifies it.
- CPU patches (megatron/cpu.py): the same five apply, unchanged, to every supported version (`CPU_PATCHES`).

Importing this module imports neither megatron nor torch: the CLI asks `version_warning()` at start-up.
"""

from __future__ import annotations

import json
import re
from importlib import metadata as _metadata
from importlib import util as _import_util
from pathlib import Path

from ..errors import CheckpointError, ConversionError

SUPPORTED = ((0, 16, 1), (0, 20, 0))  # [lowest tested, first untested)
REQUIREMENT = "megatron-core>=0.16.1,<0.20"  # the same range, as pyproject.toml states it

COMMON_PT = "common.pt"
COMMON_STATE = "common_state"
COMMON_STATE_KEY = "common_state/shard_0_1"  # ShardedObject("common_state", ..., (1,), (0,)).unique_key
# --megatron-core TARGET -> the common-state forms written for it. "any" writes both: 0.16-0.18 read common.pt
# (and need it); 0.19 reads common.pt too when present, so the object is there for tools that expect 0.19's
# layout, and the checkpoint loads unchanged once common.pt is removed.
COMMON_FORMS = {"any": (COMMON_PT, COMMON_STATE), "0.16": (COMMON_PT,), "0.17": (COMMON_PT,),
                "0.18": (COMMON_PT,), "0.19": (COMMON_STATE,)}
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
INTEGRITY_FILE = "integrity.json"
MAX_MANIFEST_BYTES = 64 << 20
# The CPU patches of megatron/cpu.py, by name, and the versions they apply to: all of them, to all of 0.16.1 ..
# 0.19.x (each was checked necessary, by leaving it out, under 0.16.1 and 0.19.2).
CPU_PATCHES = ("current_device", "synchronize", "rng_fork", "schedules_cuda_zeros", "embedding_setup_cuda")


# ---- the installed version ------------------------------------------------------------------------------


def _parse(text: str) -> tuple[int, int, int]:
    parts = []
    for p in text.split(".")[:3]:
        m = re.match(r"\d+", p)  # "0rc1" -> 0, "2+abc" -> 2
        parts.append(int(m.group()) if m else 0)
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def _source_checkout_version() -> tuple[int, int, int] | None:
    """A Megatron-LM source checkout on PYTHONPATH has no dist-info: read MAJOR/MINOR/PATCH from its
    package_info.py as text (never executed: in 0.19 it runs `git` in a subprocess)."""
    try:
        spec = _import_util.find_spec("megatron.core")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    info = Path(spec.origin).parent / "package_info.py"
    try:
        text = info.read_text()
    except OSError:
        return None
    found = {k: re.search(rf"^{k}\s*=\s*(\d+)", text, re.M) for k in ("MAJOR", "MINOR", "PATCH")}
    if not all(found.values()):
        return None
    return tuple(int(found[k].group(1)) for k in ("MAJOR", "MINOR", "PATCH"))  # type: ignore[return-value]


def installed_version() -> tuple[int, int, int] | None:
    """(major, minor, patch) of the megatron-core this process would import, or None when there is none.
    From its distribution metadata (tens of ms), not by importing it (seconds)."""
    try:
        return _parse(_metadata.version("megatron-core"))
    except _metadata.PackageNotFoundError:
        return _source_checkout_version()


def version_warning() -> str | None:
    """One line when megatron-core is missing or outside the tested range, else None."""
    v = installed_version()
    lo, hi = SUPPORTED
    if v is None:
        return f"megatron-core is not installed: spec, verify and prune --megatron need it ({REQUIREMENT})"
    if not lo <= v < hi:
        return (f"megatron-core {'.'.join(map(str, v))} is installed; hetero-convert is tested with {REQUIREMENT} "
                f"(checkpoints it writes may not load in this version, and spec/verify may fail)")
    return None


# ---- layer specs ----------------------------------------------------------------------------------------


def module_class(spec):
    """The class a layer-spec entry builds: a ModuleSpec's module; for a partial, the class it calls (or, for
    a partial of a bound classmethod such as 0.19's `MLP.as_mlp_submodule`, the class it is bound to); a bare
    class as it is."""
    import functools

    if isinstance(spec, functools.partial):
        return getattr(spec.func, "__self__", spec.func)
    module = getattr(spec, "module", None)
    return spec if module is None else module


def submodules(spec):
    """The submodules dataclass of a ModuleSpec or a partial; None for a bare class."""
    import functools

    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def describe(spec) -> str:
    """A short name for a spec entry, e.g. 'MLP(ColumnParallelLinear, RowParallelLinear)': the same string for
    0.16's ModuleSpec and 0.19's partial of the same modules."""
    cls = module_class(spec)
    name = getattr(cls, "__name__", type(cls).__name__)
    subs = submodules(spec)
    if subs is None or not hasattr(subs, "__dataclass_fields__"):
        return name
    parts = [describe(getattr(subs, f)) for f in subs.__dataclass_fields__ if getattr(subs, f) is not None]
    return f"{name}({', '.join(parts)})" if parts else name


def te_available() -> bool:
    """Whether megatron-core itself found a usable Transformer Engine (the same flag in 0.16 .. 0.19). A bare
    `import transformer_engine` can succeed where megatron's import fails, and 0.19's heterogeneous spec then
    holds None for every TE class."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # noqa: BLE001 - any failure to import means: no TE here
        return False
    return bool(HAVE_TE)


# ---- common state ---------------------------------------------------------------------------------------


def common_forms(target: str) -> tuple[str, ...]:
    """The common-state forms to write for a `--megatron-core` target (see COMMON_FORMS)."""
    forms = COMMON_FORMS.get(str(target))
    if forms is None:
        raise ConversionError(f"megatron_core (--megatron-core) must be one of {', '.join(COMMON_FORMS)}, "
                              f"got {target!r}")
    return forms


def common_state_source(it_dir: str | Path) -> str:
    """Where `read_common_state` reads from, for messages."""
    it_dir = Path(it_dir)
    return str(it_dir / COMMON_PT) if (it_dir / COMMON_PT).is_file() else f"{it_dir}: object '{COMMON_STATE_KEY}'"


def read_common_state(it_dir: str | Path, reader=None) -> dict | None:
    """The common state of an iteration folder (`iteration`, `checkpoint_version`, a training run's `args`):
    `common.pt` if present (0.16-0.18, and what 0.19's own loader prefers), else the `common_state` object
    inside the DCP data (0.19), else None. Read with torch.load(weights_only=True) and the allow-list of
    `io.safe_pickle.load_common`; megatron is not imported. `reader`: a DCPReader of the folder, if open."""
    from ..io.dcp import DCPReader
    from ..io.hf_index import quoted
    from ..io.safe_pickle import METADATA_FILE, load_common

    it_dir = Path(it_dir)
    if (it_dir / COMMON_PT).is_file():
        state = load_common(it_dir / COMMON_PT)
        if not isinstance(state, dict):
            raise CheckpointError(f"{it_dir / COMMON_PT}: holds a {type(state).__name__}, not a dict")
        return state
    if reader is None:
        if not (it_dir / METADATA_FILE).is_file():
            return None
        reader = DCPReader(it_dir)
    if COMMON_STATE_KEY not in reader.object_keys():
        return None
    loaded = reader.load_object(COMMON_STATE_KEY)
    # megatron stores every ShardedObject's data wrapped in a one-element list
    if not (isinstance(loaded, list) and len(loaded) == 1 and isinstance(loaded[0], dict)):
        raise CheckpointError(f"{it_dir / METADATA_FILE}: {quoted(COMMON_STATE_KEY)} holds a {type(loaded).__name__}, "
                              f"not megatron's one-element list of a dict")
    return loaded[0]


def common_state_payload(state: dict):
    """The bytes megatron 0.19 stores for the common_state object (torch.save([state])), as a BytesIO."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save([state], buf)
    buf.seek(0)
    return buf


# ---- integrity manifest ---------------------------------------------------------------------------------


def read_integrity_manifest(it_dir: str | Path) -> dict[str, str] | None:
    """{file name: sha256 hex digest} from the folder's integrity.json, or None when it has none. Refused (one
    line naming the file): malformed JSON, an algorithm other than sha256 (megatron accepts only that), a
    name that is not a plain file of the folder, or a value that is not a sha256 digest."""
    from ..io.hf_index import plain_file_name, quoted

    path = Path(it_dir) / INTEGRITY_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, too large for an integrity manifest")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{path}: not an integrity manifest (no 'files' object)")
    algorithm = data.get("algorithm", "sha256")
    if algorithm != "sha256":
        raise CheckpointError(f"{path}: hash algorithm {str(algorithm)[:40]!r} is not supported (megatron "
                              f"writes and checks sha256)")
    for name, digest in data["files"].items():
        if not plain_file_name(name) or name == INTEGRITY_FILE:
            raise CheckpointError(f"{path}: lists {quoted(name)}, not a plain file name of the folder")
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-fA-F]{64}", digest)):
            raise CheckpointError(f"{path}: the digest of {quoted(name)} is not a sha256 hex digest")
    return {name: digest.lower() for name, digest in data["files"].items()}
