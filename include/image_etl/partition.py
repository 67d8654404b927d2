"""Byte-balanced shards: one per device, never more shards than images.

Decode time grows with the file's bytes, not with its count, so shards are balanced by bytes
(longest-processing-time first: biggest file to the lightest shard). Within a shard images keep
the drop's order, so a shard's content and order are deterministic for a given manifest.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def balance(items: Sequence[T], sizes: Sequence[int], parts: int) -> list[list[T]]:
    """Split ``items`` into at most ``parts`` non-empty groups of near-equal total size."""
    if parts < 1:
        raise ValueError("parts must be at least 1")
    if len(items) != len(sizes):
        raise ValueError("items and sizes differ in length")
    parts = min(parts, len(items))
    if parts == 0:
        return []
    heap = [(0, k) for k in range(parts)]
    members: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(items)), key=lambda i: (-sizes[i], i)):
        load, k = heapq.heappop(heap)
        members[k].append(i)
        heapq.heappush(heap, (load + max(int(sizes[i]), 1), k))
    return [[items[i] for i in sorted(group)] for group in members]
