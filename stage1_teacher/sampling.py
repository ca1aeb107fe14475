"""Draws for sampled cache rows (RS-KD, Anshumann et al. 2025, "Sparse Logit Sampling"): N tokens per row,
with replacement, from the teacher's distribution p at temperature 1, by inverse CDF.

The uniforms are made here, per sample, from (seed, a stable hash of the sample id), and handed to the
backend: the draws then depend only on the teacher's numbers, not on the engine, the batch or the process,
so a resumed or repeated run writes identical parts, and the vLLM and HF backends draw the same tokens
wherever both can (up to float rounding at CDF edges).
"""

from __future__ import annotations

import hashlib

import numpy as np

TAIL_DRAW = -1
"""A draw that fell outside the row's top-K (vLLM, whose prompt log-probs stop at the top-K)."""


def sample_uniforms(seed: int, sample_id: str, rows: int, draws: int) -> np.ndarray:
    """float64 [rows, draws] uniforms in [0, 1) for one sample, from a numpy Generator seeded by (seed, the
    first 8 bytes of SHA-256 of the sample id): never Python's hash(), which differs between processes."""
    key = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key]).random((rows, draws))


def draws_from_topk(ids: np.ndarray, logprobs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws over each row's top-K: ids [R, K] and log-probs [R, K] in rank order, uniforms
    [R, N] -> int64 [R, N] token ids; the CDF is the cumulative sum of exp(log-probs) in float64 in rank order,
    and u at or beyond the row's top-K mass gives TAIL_DRAW."""
    rows, k = np.shape(logprobs)
    n = np.shape(uniforms)[1]
    cdf = np.cumsum(np.exp(np.asarray(logprobs, dtype=np.float64)), axis=1)  # [R, K]
    u = np.asarray(uniforms, dtype=np.float64)  # [R, N]
    # One searchsorted over all rows: row r's CDF and uniforms are lifted by 4r, above the row before it
    # (a CDF ends near 1, a uniform is below 1), so no search can cross into another row.
    lift = 4.0 * np.arange(rows, dtype=np.float64)[:, None]
    pos = np.searchsorted((cdf + lift).ravel(), (u + lift).ravel(), side="right").reshape(rows, n)
    col = np.clip(pos - k * np.arange(rows)[:, None], 0, k)  # first column whose CDF exceeds u; k when none does
    # The lift rounds u and the CDF to float64's spacing at 4r (2**-30 at r = 2**20): step the rare column it
    # moved back to the exact count of CDF entries <= u, so that a draw depends on its row alone, not on the
    # row's index in this call (batching, chunks).
    r = np.arange(rows)[:, None]
    while (up := (col < k) & (cdf[r, np.minimum(col, k - 1)] <= u)).any():
        col += up
    while (down := (col > 0) & (cdf[r, np.maximum(col - 1, 0)] > u)).any():
        col -= down
    out = np.full((rows, n), TAIL_DRAW, dtype=np.int64)
    inside = col < k
    out[inside] = np.asarray(ids, dtype=np.int64)[np.nonzero(inside)[0], col[inside]]
    return out
