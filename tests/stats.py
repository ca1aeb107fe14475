"""Statistics the sampling tests share."""

from __future__ import annotations

import numpy as np


def chi_square(draws: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Pearson's chi-square of draws (any shape) against p [V], smallest cells pooled until each expects >= 5."""
    observed = np.bincount(draws.ravel(), minlength=len(p))
    expected = p * draws.size
    obs_cells, exp_cells, o, e = [], [], 0.0, 0.0
    for i in np.argsort(expected):
        o, e = o + observed[i], e + expected[i]
        if e >= 5:
            obs_cells.append(o), exp_cells.append(e)
            o, e = 0.0, 0.0
    exp_cells[-1] += e
    obs_cells[-1] += o
    obs_cells, exp_cells = np.array(obs_cells), np.array(exp_cells)
    return float(((obs_cells - exp_cells) ** 2 / exp_cells).sum()), len(obs_cells) - 1
