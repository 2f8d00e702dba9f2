"""Types and bounds of a raw config.json, checked before anything is built from it.

A config comes with the checkpoint and is as untrusted as its tensors. The plan builder assumes numbers are
numbers: without this check `"num_hidden_layers": 1e9` builds a billion layers (and `inspect` runs until it
is killed), `-8` KV heads prints a negative KV cache, `"hidden_size": "4096"` or `NaN` end in a traceback.
Here every field the plan reads must have its type (a bool is not an int; a float must be finite), be
positive where a count is meant, and stay within bounds far above any real model (2048 layers, a hidden
size of 10^6, 10^5 heads, a vocabulary of 10^8). Lists must have the length the config claims *before*
anything loops over that length, so the work done is proportional to the config's size, not its claims.

One function, `check_config`, raising `PlanError` with one line naming the field (and the layer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import PlanError

# 12x Ultra-253B's 162. The layout search (`layout.pipeline_split`) tries every first/last stage pair, so its
# work grows with the square of the layers: 2048 keep `inspect` near a second, 10^4 took 75 s.
MAX_LAYERS = 2048
MAX_HIDDEN = 10**6
MAX_HEADS = 10**5
MAX_VOCAB = 10**8
MAX_WIDTH = 10**8
MAX_POSITIONS = 10**9
MAX_CONFIG_BYTES = 64 * 2**20  # real block_configs lists are < 200 KB

# name: upper bound, for the positive integers of the top level
TOP_COUNTS = {
    "hidden_size": MAX_HIDDEN, "num_attention_heads": MAX_HEADS, "num_hidden_layers": MAX_LAYERS,
    "vocab_size": MAX_VOCAB, "intermediate_size": MAX_WIDTH, "num_key_value_heads": MAX_HEADS,
    "head_dim": MAX_HIDDEN, "max_position_embeddings": MAX_POSITIONS,
}
TOP_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "o_proj_bias")
TOP_STRINGS = ("hidden_act", "torch_dtype", "dtype", "model_type")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
ROPE_FLOATS = ("factor", "low_freq_factor", "high_freq_factor", "rope_theta")
ATTENTION_COUNTS = {"n_heads_in_group": MAX_HEADS, "num_key_value_heads": MAX_HEADS}
FFN_COUNTS = {"intermediate_size": MAX_WIDTH}
SUBBLOCK_BOOLS = ("no_op", "replace_with_linear")


class _Bad(ValueError):
    """A field that fails its check; `check_config` prefixes the file (or "config") and raises PlanError."""


def _error(message: str) -> Exception:
    return _Bad(message)


def _plan_error(message: str) -> Exception:
    return PlanError(message)


def _show(value: object) -> str:
    """A value from the config on one short line (strings JSON-quoted, so control characters are escaped)."""
    if type(value) is int and value.bit_length() > 200:  # str() of a 5,000-digit int raises
        return f"an integer of {value.bit_length()} bits"
    try:
        s = json.dumps(value) if isinstance(value, (str, bool, type(None))) else repr(value)
    except ValueError:  # an int nested in a list, too long to print
        s = f"a {type(value).__name__}"
    return s if len(s) <= 60 else s[:57] + "..."


def _count(value: object, field: str, bound: int) -> int:
    if type(value) is not int:  # bool is an int subclass; 2.0 and "2" are not counts
        raise _error(f"{field} must be a positive integer, got {_show(value)}")
    if not 0 < value <= bound:
        raise _error(f"{field} must be a positive integer up to {bound}, got {_show(value)}")
    return value


def _name(value: object, field: str) -> str:
    """A short printable string (an activation, a dtype, a RoPE type): messages quote it on one line."""
    if type(value) is not str or len(value) > 64 or not value.isprintable():
        raise _error(f"{field} must be a short printable string, got {_show(value)}")
    return value


def _positive_float(value: object, field: str, below: float = math.inf) -> float:
    finite = type(value) is int or (type(value) is float and math.isfinite(value))  # isfinite(10**400) raises
    if not finite or not 0 < value < below or value > 1e300:
        bound = "" if below == math.inf else f" below {below:g}"
        raise _error(f"{field} must be a finite positive number{bound}, got {_show(value)}")
    return float(value)  # in range: an int here is below 1e300


def check_config(cfg: object, where: str = "config") -> None:
    """Refuse a raw config dict whose fields have the wrong type or an impossible value (see module doc):
    PlanError "{where}: {field} ...", where is the config file when there is one."""
    try:
        _check(cfg)
    except _Bad as e:
        raise _plan_error(f"{where}: {e}") from None


def _check(cfg: object) -> None:
    if not isinstance(cfg, dict):
        raise _error(f"a JSON {type(cfg).__name__}, not an object")
    for key, bound in TOP_COUNTS.items():
        if cfg.get(key) is not None:
            _count(cfg[key], key, bound)
    for key in TOP_BOOLS:
        if cfg.get(key) is not None and type(cfg[key]) is not bool:
            raise _error(f"{key} must be true or false, got {_show(cfg[key])}")
    for key in TOP_STRINGS:
        if cfg.get(key) is not None:
            _name(cfg[key], key)
    for key in TOKEN_IDS:
        _token_ids(cfg.get(key), key)
    # read with a default when absent; an explicit null is neither the default nor a value
    params = cfg.get("rope_parameters")
    for key in ("max_position_embeddings", "rms_norm_eps", "rope_theta"):
        if key in cfg and cfg[key] is None and not (key == "rope_theta" and isinstance(params, dict)
                                                    and "rope_theta" in params):
            raise _error(f"{key} is null; leave it out for the default or give a value")
    if cfg.get("rms_norm_eps") is not None:
        _positive_float(cfg["rms_norm_eps"], "rms_norm_eps", below=1.0)
    if cfg.get("rope_theta") is not None:
        _positive_float(cfg["rope_theta"], "rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        _rope(cfg.get(key), key)

    # Per-layer lists: their length must equal the claimed layer count before anything walks them.
    layers = cfg.get("num_hidden_layers")
    blocks = cfg.get("block_configs")
    if blocks is not None:
        if type(blocks) is not list:
            raise _error(f"block_configs must be a list, got {type(blocks).__name__}")
        if type(layers) is int and len(blocks) != layers:
            raise _error(f"block_configs has {len(blocks)} blocks but num_hidden_layers is {layers}")
        hidden = cfg.get("hidden_size")
        for i, block in enumerate(blocks):
            _block(i, block, hidden)
    per_layer = cfg.get("num_key_value_heads_per_layer")
    if per_layer is not None and blocks is None:
        if type(per_layer) is not list:
            raise _error(f"num_key_value_heads_per_layer must be a list, got {type(per_layer).__name__}")
        if type(layers) is int and len(per_layer) != layers:
            raise _error(f"num_key_value_heads_per_layer has {len(per_layer)} entries but num_hidden_layers is "
                         f"{layers}")
        for i, kv in enumerate(per_layer):
            _count(kv, f"num_key_value_heads_per_layer[{i}] (layer {i})", MAX_HEADS)


def _token_ids(value: object, key: str) -> None:
    """None, an id, or a list of ids (Llama 3 has three eos ids): carried into the exported config."""
    ids = value if type(value) is list else [value] if value is not None else []
    if len(ids) > 1024 or not all(type(t) is int and -1 <= t < MAX_VOCAB for t in ids):
        raise _error(f"{key} must be a token id or a list of token ids, got {_show(value)}")


def _rope(rs: object, key: str) -> None:
    if rs is None:
        return
    if type(rs) is not dict:
        raise _error(f"{key} must be an object or null, got {_show(rs)}")
    for name in ("rope_type", "type"):
        if rs.get(name) is not None:
            _name(rs[name], f"{key}.{name}")
    for name in ROPE_FLOATS:
        if rs.get(name) is not None:
            _positive_float(rs[name], f"{key}.{name}")
    if rs.get("original_max_position_embeddings") is not None:
        _count(rs["original_max_position_embeddings"], f"{key}.original_max_position_embeddings", MAX_POSITIONS)


def _block(i: int, block: object, hidden: int | None) -> None:
    if type(block) is not dict:
        raise _error(f"layer {i}: block_configs[{i}] must be an object, got {_show(block)}")
    for part, counts in (("attention", ATTENTION_COUNTS), ("ffn", FFN_COUNTS), ("mlp", FFN_COUNTS)):
        d = block.get(part)
        if d is None:
            continue
        if type(d) is not dict:
            raise _error(f"layer {i}: {part} must be an object, got {_show(d)}")
        for key, bound in counts.items():
            if d.get(key) is not None:
                _count(d[key], f"layer {i}: {part}.{key}", bound)
        for key in SUBBLOCK_BOOLS:
            if d.get(key) is not None and type(d[key]) is not bool:
                raise _error(f"layer {i}: {part}.{key} must be true or false, got {_show(d[key])}")
        if part != "attention" and d.get("ffn_mult") is not None:
            mult = _positive_float(d["ffn_mult"], f"layer {i}: {part}.ffn_mult", below=1e4)
            if type(hidden) is int:
                from .plan import ffn_mult_to_width

                width = ffn_mult_to_width(mult, hidden)
                if not 0 < width <= MAX_WIDTH:
                    raise _error(f"layer {i}: {part}.ffn_mult {mult:g} gives an FFN width of {width} at "
                                 f"hidden_size {hidden}")


def read_config_file(path: Path) -> dict:
    """config.json as a dict: bounded in size, a JSON object, no key twice (json keeps the last silently)."""
    try:
        size = path.stat().st_size
        raw = path.read_bytes() if size <= MAX_CONFIG_BYTES else None
    except OSError as e:
        raise _plan_error(f"{path}: cannot be read ({e.strerror or e})") from None
    if raw is None:
        raise _plan_error(f"{path}: {size} bytes, more than any config.json ({MAX_CONFIG_BYTES})")
    return parse_config_text(raw, str(path))


def parse_config_text(raw: str | bytes, where: str) -> dict:
    """A config's JSON text (a file's, or the one a training run keeps in its args) as a dict, with the
    checks of `read_config_file`; PlanError naming `where` otherwise."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise _plan_error(f"{where}: {len(raw)} bytes, more than any config.json ({MAX_CONFIG_BYTES})")
    try:
        cfg = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise _plan_error(f"{where}: the key {_show(e.args[0])} appears twice in one object") from None
    except RecursionError:
        raise _plan_error(f"{where}: not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _plan_error(f"{where}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(cfg, dict):
        raise _plan_error(f"{where}: a JSON {type(cfg).__name__}, not an object")
    return cfg


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out
