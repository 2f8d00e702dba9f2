"""Our description of a Megatron checkpoint (`hetero_convert.json`), checked before anything is built from it.

Someone else can write one, so it is as untrusted as the tensors. What it says must agree with:
  - **itself**: every field has its type and bounds; the plan is one that its own config form gives back
    exactly (`ModelPlan.hf_config()` / `llama_config()` through the config validator, so a plan carries
    nothing the validator would refuse, and no ffn_mult that states another width than the layer's);
    `hf_block_configs` and `megatron_block_configs` are the plan's; `padded_vocab_size` is the vocabulary
    padded for `tensor_parallel`;
  - **the source record it carries**: the plan is exactly what the recorded source config.json gives (a
    rope theta, an eps or a vocabulary size edited in the plan alone is refused);
  - **the stored tensors** (`tensor_problems`, given DCP's metadata): the vocabulary rows of the embedding
    and output layer are exactly `padded_vocab_size` (a smaller vocabulary would cut real rows), split in
    `tensor_parallel` chunks, `dtype` is the stored tensors' dtype, and (TP, PP) is a layout the model can be
    written at. Widths, KV heads, hidden size, layer count and tying are the plan's shapes and keys, which
    `check_megatron_keys` compares exactly.
Every refusal is one `CheckpointError` line naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import CheckpointError, PlanError
from ..puzzletron import FORMATS as PUZZLETRON_FORMATS

SOURCE_FORMATS = ("decilm", "decilm-newer", "decilm-7b", "llama", *PUZZLETRON_FORMATS)
# Plan fields that its config form (`hf_config()`) does not carry: taken as stated (checked against the source
# record when there is one). A new ModelPlan field either round-trips through hf_config / load_plan or is
# listed here.
NOT_IN_CONFIG_FORM = ("source_format",)
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # dtypes.CONFIG's names (kept torch-free: `inspect` reads this)
MAX_PARALLEL = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _show(value, limit: int = 80) -> str:
    if type(value) is int and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    text = json.dumps(value, default=lambda o: f"<{type(o).__name__}>")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain_name(name) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..")
            and not any(c in name for c in "/\\") and all(ord(c) >= 32 for c in name))


def check_description(desc: dict, path: Path) -> None:
    """Types and bounds of every field a reader uses; refuses naming the field."""
    def bad(field: str, why: str):
        raise CheckpointError(f"{path}: {field} {why}")

    from .megatron_checkpoint import DESCRIPTION_FORMAT, FORMAT_VERSION, HF_FILES_DIR

    if not isinstance(desc.get("plan"), dict):
        bad("plan", "is missing or not an object: not a hetero_convert description")
    if desc.get("format") != DESCRIPTION_FORMAT:
        bad("format", f"is {_show(desc.get('format'))}, not {DESCRIPTION_FORMAT!r}")
    if type(desc.get("format_version")) is not int or desc["format_version"] != FORMAT_VERSION:
        bad("format_version", f"is {_show(desc.get('format_version'))}; this version reads {FORMAT_VERSION}")
    for key, top in (("tensor_parallel", MAX_PARALLEL), ("pipeline_parallel", MAX_PARALLEL),
                     ("padded_vocab_size", 2 * 10**8)):  # written by every version: required
        if not (type(desc.get(key)) is int and 0 < desc[key] <= top):
            bad(key, f"is {_show(desc.get(key))}, not a positive integer up to {top}")
    if desc.get("dtype") not in DTYPE_NAMES:
        bad("dtype", f"is {_show(desc.get('dtype'))}, not one of {list(DTYPE_NAMES)}")
    for key in ("hf_block_configs", "megatron_block_configs"):
        if key in desc and not isinstance(desc[key], list):
            bad(key, f"is {_show(desc[key])}, not a list")
    source = desc.get("source")
    if source is not None:
        if not isinstance(source, dict):
            bad("source", f"is {_show(source)}, not an object")
        if source.get("source_config") is not None and not isinstance(source["source_config"], dict):
            bad("source.source_config", f"is {_show(source['source_config'])}, not an object")
        for key in ("source_dir", "source_format"):
            if source.get(key) is not None and not isinstance(source[key], str):
                bad(f"source.{key}", f"is {_show(source[key])}, not a string")
        sums = source.get("file_sha256")
        if sums is not None and not (isinstance(sums, dict) and all(
                _plain_name(k) and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in sums.items())):
            bad("source.file_sha256", "is not an object of file name -> sha256 hex digest")
    carried = desc.get("hf_files")
    if carried is not None:
        if not isinstance(carried, dict) or carried.get("dir") != HF_FILES_DIR:
            bad("hf_files", f"is {_show(carried)}, not an object with dir {HF_FILES_DIR!r}")
        if not (isinstance(carried.get("files"), list) and all(_plain_name(f) for f in carried["files"])):
            bad("hf_files.files", "is not a list of plain file names")
    if "resharded_from" in desc and not isinstance(desc["resharded_from"], dict):
        bad("resharded_from", f"is {_show(desc['resharded_from'])}, not an object")


def _json(value):
    return json.loads(json.dumps(value))


def first_difference(a, b, where: str = "") -> str | None:
    """Where two JSON values first differ, types included (1, 1.0 and true are three different values):
    'layers[3].ffn.width: 512 here, 768 there', or None."""
    if type(a) is not type(b) and not (isinstance(a, float) and isinstance(b, float)):
        return f"{where or 'value'}: {_show(a)} here, {_show(b)} there"
    if isinstance(a, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{where}.{k}: {'absent' if k not in a else _show(a[k])} here, " \
                       f"{'absent' if k not in b else _show(b[k])} there".lstrip(".")
            d = first_difference(a[k], b[k], f"{where}.{k}".lstrip("."))
            if d:
                return d
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        if len(a) != len(b):
            return f"{where}: {len(a)} entries here, {len(b)} there"
        return None
    if isinstance(a, float) and (a != b or math.copysign(1, a) != math.copysign(1, b)):
        return f"{where}: {_show(a)} here, {_show(b)} there"
    return None if a == b else f"{where}: {_show(a)} here, {_show(b)} there"


def _without_prefix(e: PlanError) -> str:
    text = str(e)
    return text[len("config: "):] if text.startswith("config: ") else text


def plan_from_description(desc: dict, path: Path):
    """The plan the description states, once it agrees with itself and with its source record."""
    from ..plan import ModelPlan, load_plan

    raw = desc["plan"]
    try:
        plan = ModelPlan.from_json(raw)
        regenerated = plan.config_form()
    except Exception as e:  # noqa: BLE001 - untrusted input: whatever shape of nonsense, refused here, named
        text = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"{path}: plan: malformed ({type(e).__name__}: {text})") from None
    if plan.source_format == "llama" and regenerated.get("model_type") != "llama":
        raise CheckpointError(f"{path}: plan.source_format is 'llama', but its layers are not all one Llama layer")
    if plan.source_format not in SOURCE_FORMATS:
        raise CheckpointError(f"{path}: plan.source_format is {_show(plan.source_format)}, not one of "
                              f"{list(SOURCE_FORMATS)}")
    try:
        checked = load_plan(regenerated)  # every count, bound and type of config.json's validator
    except PlanError as e:
        raise CheckpointError(f"{path}: plan: {_without_prefix(e)}") from None
    stated = _json(raw)
    again = _json(checked.to_json()) | {k: stated[k] for k in NOT_IN_CONFIG_FORM if k in stated}
    diff = first_difference(stated, again)
    if diff:
        raise CheckpointError(f"{path}: plan.{diff} (the plan rebuilt from its own config form): the plan "
                              f"contradicts itself")
    for key, derived in (("hf_block_configs", checked.hf_block_configs),
                         ("megatron_block_configs", checked.megatron_block_configs)):
        if key in desc:
            diff = first_difference(desc[key], _json(derived()), key)
            if diff:
                raise CheckpointError(f"{path}: {diff} (from the plan): the description contradicts its plan")
    source_config = (desc.get("source") or {}).get("source_config")
    if source_config is not None:
        try:
            recorded = load_plan(source_config)
        except PlanError as e:
            raise CheckpointError(f"{path}: source.source_config: {_without_prefix(e)}") from None
        diff = first_difference(stated, _json(recorded.to_json()))
        if diff:
            raise CheckpointError(f"{path}: plan.{diff} (from the recorded source config.json): the description "
                                  f"contradicts its source record")
    return ModelPlan.from_json(again)


def tensor_problems(desc: dict, plan, maps, stored: dict) -> list[str]:
    """What the description says that the stored tensors (DCP metadata: `stored[key].size`, `.chunks`,
    `.properties.dtype`) contradict. `maps` are the plan's mappings (at TP 1)."""
    from ..dtypes import CONFIG as DTYPES, config_name
    from ..layout import check_layout, padded_vocab_size

    problems = []
    tp, pp, padded = desc["tensor_parallel"], desc["pipeline_parallel"], desc["padded_vocab_size"]
    layout = check_layout(plan, tp, pp)  # (pipeline_parallel says nothing else a reader uses)
    if not layout.ok:
        problems.append(f"tensor_parallel {tp} and pipeline_parallel {pp} are no layout this model can be written "
                        f"at: {'; '.join(layout.grouped())}")
    if padded != padded_vocab_size(plan.vocab_size, tp):
        problems.append(f"padded_vocab_size is {padded}, but the vocabulary of {plan.vocab_size} padded for "
                        f"TP={tp} is {padded_vocab_size(plan.vocab_size, tp)}")
    for m in maps:
        md = stored.get(m.megatron)
        if not m.vocab_padded or md is None:
            continue
        rows = tuple(md.size)[0]
        if rows != padded:
            problems.append(f"'{m.megatron}' stores {rows} vocabulary rows, the description says "
                            f"padded_vocab_size {padded}")
        if m.tp_rule == "rows" and len({tuple(c.offsets)[0] for c in md.chunks}) != tp:
            problems.append(f"'{m.megatron}' is stored in {len({tuple(c.offsets)[0] for c in md.chunks})} row "
                            f"chunk(s), the description says tensor_parallel {tp}")
    held = {stored[m.megatron].properties.dtype for m in maps if m.megatron in stored}
    if held and DTYPES[desc["dtype"]] not in held:  # one of them when the source mixed dtypes (norms in fp32)
        problems.append(f"dtype is {desc['dtype']}, the stored tensors are "
                        f"{sorted(map(config_name, held))}")
    return problems


def padding_checked(m) -> bool:
    """Whether `padding_problem` looks at `m`'s padding rows: the embedding's (see there)."""
    return m.vocab_padded and m.megatron.startswith("embedding.")


def padding_problem(m, pad) -> str | None:
    """The rows of the embedding beyond the vocabulary (`pad`: rows vocab_rows.. of the stored tensor) are cut
    off on the way out. Our writers fill them with zeros (Megatron's padding), and training keeps them so (no
    token id reaches them), so in a checkpoint that carries our description a non-zero row there is a real row
    that a smaller vocab_size would cut: the one thing about the vocabulary that the shapes cannot tell when
    both sizes pad to the same rows. (The output layer's padding rows do get gradients; they are not checked.)"""
    if not padding_checked(m) or pad.numel() == 0 or not bool(pad.any()):
        return None
    first = m.vocab_rows + int(pad.reshape(pad.shape[0], -1).any(dim=1).nonzero()[0, 0])
    return (f"vocab_size {m.vocab_rows} would cut real rows: row {first} of '{m.megatron}' lies beyond it and is "
            f"not the zero padding this tool writes there")
