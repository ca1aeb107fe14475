"""Sampled rows (RS-KD) between the teacher's draws and the stored arrays: `count_draws` (writer) and
`decode_sampled` (reader, verify). The format and why it is unbiased: `cache_schema.format`'s docstring.

A row of N draws is stored as its distinct drawn ids with their draw counts, in descending count order,
ties by ascending id; draws outside the teacher's top-K (-1) are not stored, only implied: tail draws =
N - sum of the row's counts.
"""

from __future__ import annotations

import numpy as np

from cache_schema.format import DRAW_COUNTS, PAD_LOGPROB, TOPK_COUNTS, TOPK_IDS
from cache_schema.topk_rows import DecodedRows, pad_ids


def count_draws(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R, N) integer draws in [-1, vocab) -> (counts_per_row (R,) uint32 distinct ids per row,
    ids_flat (E,) uint32, draw_counts_flat (E,) uint16), E = sum of counts_per_row; each row's entries in
    descending count order, ties by ascending id; -1 draws are left out."""
    d = np.sort(np.asarray(draws, dtype=np.int64), axis=1)  # [R, N], -1 first
    rows, n = d.shape
    flat = d.ravel()
    # A run of equal values starts at column 0 of every row and wherever the value changes, so no run
    # crosses a row boundary.
    starts = np.ones(d.shape, dtype=bool)
    starts[:, 1:] = d[:, 1:] != d[:, :-1]
    first = np.flatnonzero(starts.ravel())
    lengths = np.diff(np.append(first, flat.size))
    real = flat[first] >= 0
    first, lengths = first[real], lengths[real]
    row, ids = first // n if n else first, flat[first]
    order = np.lexsort((ids, -lengths, row))  # by row, then descending count, then ascending id
    counts = np.bincount(row, minlength=rows).astype(np.uint32)
    return counts, ids[order].astype(np.uint32), lengths[order].astype(np.uint16)


def decode_sampled(stored: dict[str, np.ndarray], draws: int, width: int, vocab_size: int) -> DecodedRows:
    """A sample's stored sampled arrays (topk_counts (R,), topk_ids (E,), draw_counts (E,)) -> DecodedRows of
    `width` (>= draws) columns: ids padded like mass-adaptive rows (rows.pad_ids), log-probs log(c / N) in
    float32 and PAD_LOGPROB past the counts, tail = (N - sum c) / N. ValueError when the arrays do not fit
    together."""
    counts = np.asarray(stored[TOPK_COUNTS], dtype=np.int64)
    ids, draw_counts = stored[TOPK_IDS], stored[DRAW_COUNTS]
    starts = np.concatenate([[0], np.cumsum(counts)])
    if (counts > draws).any() or starts[-1] != len(ids) or len(ids) != len(draw_counts):
        raise ValueError(f"{len(ids)} stored ids and {len(draw_counts)} draw counts for rows of {int(starts[-1])} "
                         f"entries (counts must be in 0..{draws})")
    rows = len(counts)
    valid = np.arange(width) < counts[:, None]  # [R, W]
    out_ids = np.zeros((rows, width), dtype=np.int64)
    out_ids[valid] = ids
    c = np.zeros((rows, width), dtype=np.float64)
    c[valid] = draw_counts
    with np.errstate(divide="ignore"):
        logprobs = np.where(valid, np.log(c / draws), PAD_LOGPROB).astype(np.float32)
    drawn = c.sum(axis=1)
    pad_ids(out_ids, counts, vocab_size, clean=True)  # columns past the counts hold 0, below every id
    tail = np.clip((draws - drawn) / draws, 0.0, 1.0).astype(np.float32)
    return DecodedRows(ids=out_ids, logprobs=logprobs, counts=counts, tail=tail)
