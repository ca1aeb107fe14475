"""The format's promises about top-K rows, checked in one place: the writer checks the teacher's rows with
them, stage 1 the rows that sampled draws come from, and verify the decoded rows (with the encoding's
error bound as slack)."""

from __future__ import annotations

import numpy as np

from common.errors import UserError

# Writer tolerances on the teacher's float32 log-probs (float error in its log-softmax).
LOGPROB_POSITIVE_TOL = 1e-4
PROB_SUM_TOL = 1e-3


def row_violations(topk_ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, *, positive_tol: float = 0.0,
                   logprob_slack: np.ndarray | float = 0.0) -> list[tuple[str, np.ndarray, str]]:
    """The format's promises about top-K rows, checked together: (check name, (R,) mask of the rows that
    break it, what is wrong) for each broken promise. The writer passes the teacher's exact float32 values;
    verify passes decoded values with the encoding's error bound as `logprob_slack`."""
    with np.errstate(invalid="ignore", over="ignore"):
        checks = [
            ("finite", ~np.isfinite(logprobs).all(axis=1), "log-probs not finite"),
            ("rank_order", (np.diff(logprobs, axis=1) > 0).any(axis=1),
             "log-probs not in rank order (non-increasing along K)"),
            ("logprob_positive", (logprobs > positive_tol).any(axis=1), f"log-probs above {positive_tol:g}"),
            ("prob_sum", np.exp(logprobs - logprob_slack).sum(axis=1) > 1 + PROB_SUM_TOL,
             f"probabilities summing above 1 + {PROB_SUM_TOL:g}"),
            ("id_range", (topk_ids >= vocab_size).any(axis=1), f"top-K ids >= vocab_size {vocab_size}"),
            ("duplicate_ids", (np.diff(np.sort(topk_ids, axis=1), axis=1) == 0).any(axis=1),
             "a token id twice in a row"),
        ]
    return [(name, bad, what) for name, bad, what in checks if bad.any()]


def describe_rows(bad: np.ndarray, positions: np.ndarray, what: str) -> str:
    """'<what> in N of R rows (first at position t)' for a (R,) mask of bad rows."""
    first = int(np.flatnonzero(bad)[0])
    return f"{what} in {int(bad.sum())} of {len(bad)} rows (first at position {int(positions[first])})"


def check_teacher_rows(topk_ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, positions: np.ndarray, where: str,
                       *, min_value: float | None = None, encoding: str = "") -> None:
    """The writer's checks of a sample's teacher top-K rows (`row_violations` with the writer's tolerance, and
    log-probs >= `min_value`, the encoding's smallest, when given): UserError '<where>: <first problem>'.
    Stage 1 also runs it on the rows that sampled draws come from, which the writer never sees."""
    violations = row_violations(topk_ids, logprobs, vocab_size, positive_tol=LOGPROB_POSITIVE_TOL)
    if min_value is not None:
        too_low = logprobs.min(axis=1) < min_value
        if too_low.any():
            violations.append(("range", too_low, f"log-probs below the {encoding} encoding's minimum {min_value:g}"))
    if violations:
        _, bad, what = violations[0]
        raise UserError(f"{where}: {describe_rows(bad, positions, what)}")
