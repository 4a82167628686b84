"""What a kind of target units is like, measured the same way for every kind (scripts/target_kinds.py).

S3 tokens are content units: the same sentence in two voices gives largely the same units, and they
follow the text. Two figures say how close a stand-in comes, on sentences that two voices unseen in
training both speak:

- **agreement across voices**: the share of frame pairs with the same unit, the frames paired (a) by the
  synthesizer's true word timings, linearly within each word (no kind favoured; silence left out), and
  (b) by dynamic time warping over each kind's own features (what that kind calls alike). Chance is the
  probability that two units drawn from the kind's unit distribution agree.
- **mean run length**: frames per run of one unit (log-mel units change every few frames).
"""

from __future__ import annotations

import numpy as np

from .alignment import FRAME_S


def mean_run_length(units: list[np.ndarray]) -> float:
    """Frames per run of equal consecutive units, over all utterances."""
    runs = sum(1 + int(np.count_nonzero(np.diff(u))) for u in units if len(u))
    return sum(len(u) for u in units) / max(runs, 1)


def word_pairs(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], len_a: int,
               len_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame pairs (ia, ib) of two renditions of one word sequence, from each word's (start, end) in
    seconds: every frame of a inside a word maps to the frame at the same relative place in b's word.
    Words whose span is empty in either (espeak ran them into the one before) are skipped."""
    ia, ib = [], []
    for sa, ea, sb, eb in zip(a[0], a[1], b[0], b[1]):
        fa0, fa1 = int(sa / FRAME_S), min(len_a, int(np.ceil(ea / FRAME_S)))
        fb0, fb1 = int(sb / FRAME_S), min(len_b, int(np.ceil(eb / FRAME_S)))
        if fa1 <= fa0 or fb1 <= fb0:
            continue
        t = np.arange(fa0, fa1)
        rel = (t - fa0 + 0.5) / (fa1 - fa0)
        ia.append(t)
        ib.append(np.minimum(fb0 + (rel * (fb1 - fb0)).astype(np.int64), fb1 - 1))
    if not ia:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ia), np.concatenate(ib)


def dtw_pairs(fa: np.ndarray, fb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frame pairs of the cheapest monotonic path from (0, 0) to the ends under cosine distance
    (steps right, down and diagonal)."""
    na = fa / (np.linalg.norm(fa, axis=1, keepdims=True) + 1e-12)
    nb = fb / (np.linalg.norm(fb, axis=1, keepdims=True) + 1e-12)
    cost = 1.0 - na @ nb.T
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        # From the row above (down, diagonal) at once; then along the row, which depends on itself.
        above = np.minimum(acc[i - 1, 1:], acc[i - 1, :-1]) + cost[i - 1]
        row = acc[i]
        for j in range(1, m + 1):
            row[j] = min(above[j - 1], row[j - 1] + cost[i - 1, j - 1])
    i, j, path = n, m, []
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = int(np.argmin([acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]]))
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    path = np.asarray(path[::-1])
    return path[:, 0], path[:, 1]


def chance_agreement(units: list[np.ndarray]) -> float:
    """Probability that two units drawn independently from the units' distribution are equal."""
    counts = np.bincount(np.concatenate(units))
    p = counts / counts.sum()
    return float((p**2).sum())


def agreement(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """Share of paired frames with the same unit over all (units_a, units_b, ia, ib)."""
    same = sum(int((ua[ia] == ub[ib]).sum()) for ua, ub, ia, ib in pairs)
    total = sum(len(ia) for _, _, ia, _ in pairs)
    return same / max(total, 1)
