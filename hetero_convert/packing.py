"""The two ways work is grouped: balanced bins (threads, processes) and consecutive groups (shards).

Both are deterministic, so every process of a distributed job computes the same answer from the same inputs
and nothing has to be sent around.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence


def balance(costs: Sequence[int], bins: int) -> list[list[int]]:
    """Indices of `costs` packed into `bins` bins, largest first into the lightest bin (ties: lowest index).
    Each bin's indices come back in ascending order, so the items of a bin keep their original order.
    Ultra-253B puts FFN layers of 425,984 channels next to dummy layers with nothing in them: counts would
    balance badly, bytes balance well."""
    heap = [(0, b) for b in range(max(1, bins))]
    out: list[list[int]] = [[] for _ in range(max(1, bins))]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        out[b].append(i)
        heapq.heappush(heap, (load + costs[i], b))
    return [sorted(b) for b in out]


def pack_in_order(items: list, size_of: Callable, max_bytes: int) -> list[list]:
    """Consecutive items into groups of at most max_bytes (an item bigger than that gets a group of its own),
    in order, as transformers' save_pretrained fills shards."""
    groups, cur, size = [], [], 0
    for item in items:
        n = size_of(item)
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += n
    if cur:
        groups.append(cur)
    return groups


def share_of_files(files, rank: int, size: int) -> list:
    """Process `rank`'s share of the existing `files` among `size` processes, balanced by bytes."""
    files = [f for f in files if f.is_file()]
    return [files[i] for i in balance([f.stat().st_size for f in files], size)[rank]] if files else []
