"""Log-prob encodings keep their stated worst-case error, rank order and sign (value by value; whole rows,
with renormalisation and mass-adaptive K, are in test_cache_rows)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cache_schema import ENCODINGS, get_encoding
from common.errors import UserError

FP16_MIN = -65504.0
logprob_arrays = arrays(
    np.float32,
    st.tuples(st.integers(0, 20), st.integers(1, 16)),
    elements=st.floats(FP16_MIN, 0.0, width=32, allow_subnormal=True),
)


@pytest.mark.parametrize("name", sorted(ENCODINGS))
@settings(max_examples=200, deadline=None)
@given(x=logprob_arrays)
def test_round_trip_within_the_stated_error_bound(name, x):
    enc = get_encoding(name)
    stored = enc.encode(x)
    assert stored.dtype == enc.dtype and stored.shape == x.shape
    back = enc.decode(stored)
    assert back.dtype == np.float32 and back.shape == x.shape
    err = np.abs(back.astype(np.float64) - x.astype(np.float64))
    assert (err <= enc.error_bound(x)).all()
    assert (err <= enc.error_bound(back)).all()  # verify bounds the truth from the decoded value
    assert (back <= 0).all()


@pytest.mark.parametrize("name", sorted(ENCODINGS))
@settings(max_examples=100, deadline=None)
@given(x=logprob_arrays)
def test_rank_order_survives(name, x):
    rows = -np.sort(-x, axis=1)  # non-increasing along K
    back = get_encoding(name).decode(get_encoding(name).encode(rows))
    assert (np.diff(back, axis=1) <= 0).all()


def test_fp16_bound_is_half_an_ulp():
    enc = get_encoding("fp16")
    x = np.array([-1.0, -0.1, -10.0, -1e-6], dtype=np.float32)
    # independent statement of IEEE half: 10 fraction bits -> relative half-ulp 2**-11 for normal numbers
    expected = np.abs(x) * 2.0**-11
    assert np.allclose(enc.error_bound(x)[:3], expected[:3], rtol=1e-6, atol=2.0**-24)
    assert enc.error_bound(x)[3] >= 2.0**-25  # subnormal range: absolute half-ulp
    # the bound is tight: a value halfway between two halves loses half an ulp
    midway = np.array([[-(1.0 + 2.0**-11)]], dtype=np.float32)
    err = abs(float(enc.decode(enc.encode(midway))[0, 0]) - float(midway[0, 0]))
    assert 0.99 * enc.error_bound(midway)[0, 0] <= err <= enc.error_bound(midway)[0, 0]
    assert enc.decode(enc.encode(np.array([[5e-5]], np.float32)))[0, 0] == 0.0  # tiny positive float noise -> 0


# The worst cases as the encoding module's docstring states them, written out independently here.
STATED = {
    "fp16": lambda u: u * 2.0**-11 + 2.0**-25,
    "qlog8": lambda u: np.full(u.shape, 2.0**-9),
    "qlog5": lambda u: np.full(u.shape, 2.0**-6),
    "qsqrt5": lambda u: np.minimum(1.0, 1.4 * 2.0**-6 * np.exp(np.clip(u - 4.0, 0.0, 100.0) / 2)),
}


def _grid() -> np.ndarray:
    """Dense log-probs over the whole range, float32."""
    return -np.unique(np.concatenate([np.linspace(0, 30, 400_001), np.geomspace(1e-8, -FP16_MIN, 100_001)])
                      ).astype(np.float32)


def test_every_encoding_has_a_stated_bound():
    assert set(STATED) == set(ENCODINGS)


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_rounding_stays_within_the_documented_worst_case(name):
    enc = get_encoding(name)
    x = _grid()
    err = np.abs(enc.decode(enc.encode(x)).astype(np.float64) - x)
    stated = STATED[name](np.abs(x.astype(np.float64)))
    assert np.allclose(enc.stated_bound(x), stated, rtol=1e-12, atol=0)
    assert (err <= stated).all()
    assert (err <= enc.bin_halfwidth(enc.encode(x))).all()
    # ... and the statement is not loose: some values come within 30% of it
    assert (err >= 0.7 * stated).any()


@pytest.mark.parametrize("name", ["qlog8", "qlog5", "qsqrt5"])
def test_quantised_codes_are_compact_integers(name):
    enc = get_encoding(name)
    x = _grid()
    codes = enc.encode(x)
    assert codes.dtype == np.uint32 and codes[0] == 0 and int(codes.max()) == enc.max_code
    assert (np.diff(codes.astype(np.int64)) >= 0).all()  # rank order -> non-decreasing codes
    assert enc.decode(np.array([0], np.uint32))[0] == 0.0
    # the step near 0 is the named one: 2**-8 or 2**-5 nats
    step = 2.0 ** -int(name[-1])
    assert enc.decode(np.array([1, 2], np.uint32)).tolist() == pytest.approx([-step, -2 * step], rel=1e-6)
    if name == "qsqrt5":  # beyond the knee the step grows like 1/sqrt(p) and is capped at 2 nats
        widths = -np.diff(enc.decode(np.arange(enc.max_code + 1)).astype(np.float64))
        assert widths.max() == pytest.approx(2.0, abs=0.01) and widths[10] == pytest.approx(step)
        deep = enc.decode(np.arange(128, 190)).astype(np.float64)
        ratio = np.diff(deep)[1:] / np.diff(deep)[:-1]  # successive widths in the sqrt(p) part
        assert np.allclose(ratio, np.exp(-np.diff(deep)[:-1] / 2), rtol=0.05)
        assert math.isclose(enc.decode(np.array([enc.max_code]))[0], FP16_MIN, abs_tol=1.0)


def test_unknown_encoding_names_the_known_ones():
    with pytest.raises(UserError, match="unknown log-prob encoding 'q4'.*fp16"):
        get_encoding("q4")
