"""Sliced inference's two pieces of geometry: SAHI's slice grid and the per-image merge.

The grid is ``sahi.slicing.get_slice_bboxes``: full-size windows stepping by ``size - overlap``
pixels (overlap = ``int(ratio * size)``), row by row, the last row and column moved back to end
on the border; an image smaller than a window is one window, the whole image.

The merge follows SAHI's numpy backend (``sahi.postprocess``) step for step, so that given the
same boxes it gives the same detections: per class unless class-agnostic; boxes ranked by score
descending, ties by x1, y1, x2, y2; the pairwise IoU or IoS in float32; then

- ``nms``: each surviving box suppresses every box matching it;
- ``greedynmm``: each surviving box claims the later boxes matching it, and each claimed box,
  re-checked in float64 against the growing merged box, is merged in (union box, highest
  score, that score's class) or dropped;
- ``nmm``: the same with transitive claims (a claimed box claims what it dominates in turn).

Vectorised where SAHI is quadratic: matching pairs are found with a sort along the image's long
axis (only boxes that overlap on it are compared) instead of an N x N matrix, so 33k boxes cost
what their overlaps cost. The greedy passes are a loop over boxes, each step one array
operation on that box's matches; never a Python loop over pairs.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def slice_grid(height: int, width: int, slice_hw: tuple[int, int], overlap: float) -> np.ndarray:
    """SAHI's slice windows as an (N, 4) int array of x1, y1, x2, y2 (exclusive ends)."""
    slice_h, slice_w = slice_hw
    y_overlap, x_overlap = int(overlap * slice_h), int(overlap * slice_w)
    windows = []
    y_min = y_max = 0
    while y_max < height:
        x_min = x_max = 0
        y_max = y_min + slice_h
        while x_max < width:
            x_max = x_min + slice_w
            if y_max > height or x_max > width:
                x_max, y_max = min(width, x_max), min(height, y_max)
                x_min, y_min = max(0, x_max - slice_w), max(0, y_max - slice_h)
            windows.append((x_min, y_min, x_max, y_max))
            x_min = x_max - x_overlap
        y_min = y_max - y_overlap
    return np.asarray(windows, dtype=np.int64).reshape(-1, 4)


@dataclasses.dataclass(frozen=True)
class Merger:
    """Merges one image's detections from all its slices (and the full-image pass).

    Rows are ``staging.DET_FIELDS``: cls, conf, x1, y1, x2, y2 (full-image pixels), then the
    normalised centre box, which is recomputed for the merged rows.
    """

    merge: str = "greedynmm"  # one of settings.MERGES (the settings check the names)
    metric: str = "ios"  # one of settings.METRICS
    threshold: float = 0.5
    class_agnostic: bool = False

    def __call__(self, rows: np.ndarray, width: int, height: int) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 10)
        rows = rows[(rows[:, 2] < rows[:, 4]) & (rows[:, 3] < rows[:, 5])]  # SAHI drops these
        if len(rows) == 0:
            return _with_normalised(rows, width, height)
        groups = [np.arange(len(rows))] if self.class_agnostic else [
            np.flatnonzero(rows[:, 0] == c) for c in np.unique(rows[:, 0])]
        if self.merge == "nms":
            keep = [int(g[k]) for g in groups for k in self._nms(rows[g])]
            keep.sort(key=lambda i: rows[i, 1], reverse=True)  # SAHI: all kept, by score
            merged = rows[keep]
        else:
            merged_rows: list[np.ndarray] = []
            for g in groups:
                group = rows[g]
                merged_rows += [self._merge_into(group, keep, members)
                                for keep, members in self._claims(group).items()]
            merged = np.asarray(merged_rows).reshape(-1, 10)
        return _with_normalised(merged, width, height)

    # --- which boxes match: sparse pairs, SAHI's float32 arithmetic -----------------------

    def _order(self, rows: np.ndarray) -> np.ndarray:
        b = rows[:, 2:6].astype(np.float32)
        return np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], -rows[:, 1].astype(np.float32)))

    def _matches(self, rows: np.ndarray) -> list[np.ndarray]:
        """For each box, the indices of the other boxes whose metric reaches the threshold."""
        b = rows[:, 2:6].astype(np.float32)
        n = len(b)
        # Sweep along the long axis: after sorting by start, box i can only overlap the boxes
        # that start before it ends.
        axis = 1 if float(b[:, 3].max() - b[:, 1].min()) >= float(b[:, 2].max() - b[:, 0].min()) else 0
        start, end = b[:, axis], b[:, axis + 2]
        by_start = np.argsort(start, kind="stable")
        sorted_start = start[by_start]
        stop = np.searchsorted(sorted_start, end[by_start], side="left")
        counts = np.maximum(stop - np.arange(n) - 1, 0)
        first = np.repeat(np.arange(n), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        i, j = by_start[first], by_start[first + 1 + offsets]
        metric = self._metric(b, i, j)
        hit = metric >= np.float32(self.threshold)
        i, j = i[hit], j[hit]
        pairs_from = np.concatenate([i, j])
        pairs_to = np.concatenate([j, i])
        order = np.argsort(pairs_from, kind="stable")
        bounds = np.searchsorted(pairs_from[order], np.arange(n + 1))
        targets = pairs_to[order]
        return [targets[bounds[k]:bounds[k + 1]] for k in range(n)]

    def _metric(self, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        ix1, iy1 = np.maximum(b[i, 0], b[j, 0]), np.maximum(b[i, 1], b[j, 1])
        ix2, iy2 = np.minimum(b[i, 2], b[j, 2]), np.minimum(b[i, 3], b[j, 3])
        inter = np.maximum(0, ix2 - ix1) * np.maximum(0, iy2 - iy1)
        if self.metric == "iou":
            denominator = areas[i] + areas[j] - inter
        else:
            denominator = np.minimum(areas[i], areas[j])
        out = np.zeros(len(i), dtype=np.float32)
        np.divide(inter, denominator, out=out, where=denominator > 0)
        return out

    # --- the greedy passes (loops over boxes) --------------------------------------------------

    def _nms(self, rows: np.ndarray) -> list[int]:
        order, matches = self._order(rows), self._matches(rows)
        suppressed = np.zeros(len(rows), dtype=bool)
        keep = []
        for idx in order:
            if suppressed[idx]:
                continue
            keep.append(int(idx))
            suppressed[matches[idx]] = True
        return keep

    def _claims(self, rows: np.ndarray) -> dict[int, list[int]]:
        """Keeper → the boxes it claims, in SAHI's order (greedy or transitive)."""
        order, matches = self._order(rows), self._matches(rows)
        n = len(rows)
        rank = np.empty(n, dtype=np.intp)
        rank[order] = np.arange(n)
        claims: dict[int, list[int]] = {}
        if self.merge == "greedynmm":
            suppressed = np.zeros(n, dtype=bool)
            for position, idx in enumerate(order):
                if suppressed[idx]:
                    continue
                nb = matches[idx]
                claimed = nb[(rank[nb] > position) & ~suppressed[nb]]
                claimed = claimed[np.argsort(rank[claimed])]
                suppressed[claimed] = True
                claims[int(idx)] = claimed.tolist()
            return claims
        # nmm: box i claims box j when i dominates j (higher score, or the same score and
        # coordinates not before j's); claims pass on to the keeper of a claimed box.
        scores = rows[:, 1].astype(np.float32)
        coords = rows[:, 2:6].astype(np.float32)
        keeper_of = np.full(n, -1, dtype=np.intp)
        for idx in order:
            nb = np.sort(matches[idx])  # SAHI visits them in index order
            dominated = (scores[idx] > scores[nb]) | (
                (scores[idx] == scores[nb]) & ~_lex_less(coords[idx], coords[nb]))
            if keeper_of[idx] < 0:
                keeper_of[idx] = idx
                claims[int(idx)] = []
            keep = int(keeper_of[idx])
            for m in nb[dominated]:
                if keeper_of[m] < 0:
                    keeper_of[m] = keep
                    claims[keep].append(int(m))
        return claims

    def _merge_into(self, rows: np.ndarray, keep: int, members: list[int]) -> np.ndarray:
        """SAHI's _apply_merge for one keeper: each claimed box, checked against the merged
        box so far (float64, ``>=``), is merged in or dropped."""
        x1, y1, x2, y2 = rows[keep, 2:6].tolist()
        cls, score = float(rows[keep, 0]), float(rows[keep, 1])
        for m in members:
            mx1, my1, mx2, my2 = rows[m, 2:6].tolist()
            inter = max(0.0, min(x2, mx2) - max(x1, mx1)) * max(0.0, min(y2, my2) - max(y1, my1))
            a, b = (x2 - x1) * (y2 - y1), (mx2 - mx1) * (my2 - my1)
            value = inter / (a + b - inter) if self.metric == "iou" else inter / min(a, b)
            if value < self.threshold:
                continue
            x1, y1, x2, y2 = min(x1, mx1), min(y1, my1), max(x2, mx2), max(y2, my2)
            m_score = float(rows[m, 1])
            cls = cls if score > m_score else float(rows[m, 0])
            score = max(score, m_score)
        return np.array([cls, score, x1, y1, x2, y2, 0, 0, 0, 0], dtype=np.float64)


def _lex_less(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether coordinates ``a`` (4,) sort before each row of ``b`` (N, 4), column by column."""
    less = np.zeros(len(b), dtype=bool)
    equal = np.ones(len(b), dtype=bool)
    for col in range(4):
        less |= equal & (a[col] < b[:, col])
        equal &= a[col] == b[:, col]
    return less


def _with_normalised(rows: np.ndarray, width: int, height: int) -> np.ndarray:
    """The normalised centre box of each row, in float32 as Ultralytics' ``xywhn`` is."""
    box = rows[:, 2:6].astype(np.float32)
    xywh = np.empty_like(box)
    xywh[:, 0] = (box[:, 0] + box[:, 2]) / 2
    xywh[:, 1] = (box[:, 1] + box[:, 3]) / 2
    xywh[:, 2] = box[:, 2] - box[:, 0]
    xywh[:, 3] = box[:, 3] - box[:, 1]
    xywh[:, [0, 2]] /= np.float32(width)
    xywh[:, [1, 3]] /= np.float32(height)
    out = rows.copy()
    out[:, 6:10] = xywh
    return out
