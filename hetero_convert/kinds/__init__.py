"""The registry of sub-block kinds: which ways a layer's attention and FFN halves can look.

Adding a kind means one module here (a `SubBlockKind` subclass, registered below) and its rows in
mappings/*.toml; docs/architecture.md walks through an example. The order of each part's kinds is the order in
which `block_configs` entries are matched (`claims`): a removed sub-block wins over a replaced one, which wins
over the default kind of the part.
"""

from __future__ import annotations

from .base import ATTENTION, FFN_PART, Attention, FFN, SubBlockKind
from .gqa import GQA_ATTENTION
from .gqa_qk_norm import GQA_QK_NORM_ATTENTION
from .linear_attention import LINEAR_ATTENTION
from .linear_ffn import LINEAR_FFN
from .none import NO_ATTENTION, NO_FFN
from .swiglu import SWIGLU_FFN

_REGISTRY: dict[str, dict[str, SubBlockKind]] = {ATTENTION: {}, FFN_PART: {}}


def register(kind: SubBlockKind, first: bool = False) -> SubBlockKind:
    """Add a kind; `first` puts it ahead of the others in block_configs matching."""
    table = _REGISTRY[kind.part]
    if kind.name in table:
        raise ValueError(f"{kind.part} kind {kind.name!r} is registered already")
    if first:
        _REGISTRY[kind.part] = {kind.name: kind, **table}
    else:
        table[kind.name] = kind
    return kind


def unregister(kind: SubBlockKind) -> None:
    _REGISTRY[kind.part].pop(kind.name, None)


def get(part: str, name: str) -> SubBlockKind:
    try:
        return _REGISTRY[part][name]
    except KeyError:
        raise ValueError(f"unknown {part} kind {name!r}; known: {sorted(_REGISTRY[part])}") from None


def kinds(part: str) -> list[SubBlockKind]:
    """The part's kinds in matching order."""
    return list(_REGISTRY[part].values())


for _k in (NO_ATTENTION, LINEAR_ATTENTION, GQA_QK_NORM_ATTENTION, GQA_ATTENTION, NO_FFN, LINEAR_FFN, SWIGLU_FFN):
    register(_k)

__all__ = ["ATTENTION", "FFN_PART", "Attention", "FFN", "SubBlockKind", "get", "kinds", "register", "unregister",
           "GQA_ATTENTION", "GQA_QK_NORM_ATTENTION", "LINEAR_ATTENTION", "NO_ATTENTION", "SWIGLU_FFN", "LINEAR_FFN",
           "NO_FFN"]
