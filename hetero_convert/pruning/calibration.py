"""Calibration text: the default mix made at run time from Python's own standard library, or the user's files,
and the token windows cut from it.

The default mix has two domains, each read from the running interpreter (no file is shipped; everything is
under the Python Software Foundation License, as Python's documentation and standard library are):

    python-docs   the help() topics of `pydoc_data.topics`: the language reference, as English prose
    docstrings    the docstrings of a fixed list of standard-library modules, their classes and functions

Source code is deliberately not in it: with a third of the tokens from standard-library sources, SmolLM2 pruned
to 80% did worse on both held-out help() topics and text of another domain (docs/pruning.md).

Each domain gets the same share of the calibration tokens, and its windows are spread evenly over its text,
so no single domain or region dominates the statistics the variants are fitted on.
"""

from __future__ import annotations

import importlib
import inspect

import torch

DOCSTRING_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions",
                     "functools", "heapq", "http.client", "inspect", "ipaddress", "json", "logging", "pathlib",
                     "random", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
                     "typing", "unittest", "urllib.parse", "uuid", "zipfile")
MAX_CHARS = 400_000  # per domain: several times what 16k tokens need, and quick to tokenise


def _docstrings() -> str:
    parts = []
    for name in DOCSTRING_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if mod.__doc__:
            parts.append(inspect.cleandoc(mod.__doc__))
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj) if inspect.isclass(obj) or inspect.isfunction(obj) else None
            if doc:
                parts.append(f"{attr}: {doc}")
    return "\n\n".join(parts)[:MAX_CHARS]


def _topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:MAX_CHARS]


def default_texts() -> dict[str, str]:
    """The default calibration mix, {domain: text}; domains the interpreter cannot provide are left out."""
    out = {}
    for name, make in (("python-docs", _topics), ("docstrings", _docstrings)):
        try:
            text = make()
        except ImportError:
            continue
        if text.strip():
            out[name] = text
    if not out:
        raise ValueError("this Python has no pydoc_data or docstrings for a calibration text; use --calib")
    return out


def split_windows(ids: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens spread evenly over `ids` (fewer if the text is shorter)."""
    available = ids.numel() // seq_len
    n = min(count, available)
    if n == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    starts = torch.linspace(0, available - 1, n).round().long() * seq_len
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def mixed_windows(token_lists: dict[str, torch.Tensor], num_tokens: int, seq_len: int):
    """[n, seq_len] windows, an equal share from every domain (a short domain's shortfall goes to the others),
    interleaved domain by domain so that any evenly spaced subset sees every domain.

    Returns (windows, available tokens in whole windows, the domain of each window).
    """
    wanted = max(1, num_tokens // seq_len)
    avail = {k: v.numel() // seq_len for k, v in token_lists.items()}
    take = {k: 0 for k in token_lists}
    left = wanted
    while left > 0:
        open_ = [k for k in take if take[k] < avail[k]]
        if not open_:
            break
        share = max(1, left // len(open_))
        for k in open_:
            add = min(share, avail[k] - take[k], left)
            take[k] += add
            left -= add
            if left == 0:
                break
    per = {k: split_windows(token_lists[k], take[k], seq_len) for k in token_lists}
    order, labels = [], []
    for j in range(max(take.values(), default=0)):  # interleave: domain A window j, domain B window j, ...
        for k in token_lists:
            if j < take[k]:
                order.append(per[k][j])
                labels.append(k)
    if not order:
        total = sum(v.numel() for v in token_lists.values())
        raise ValueError(f"calibration text has {total} tokens, fewer than one sequence of {seq_len}")
    return torch.stack(order), sum(avail.values()) * seq_len, labels


def tokenize_texts(tokenizer, texts: dict[str, str]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long)
            for k, t in texts.items()}
