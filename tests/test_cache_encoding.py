"""Log-prob encodings keep their stated worst-case error, rank order and sign."""

from __future__ import annotations

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


def test_unknown_encoding_names_the_known_ones():
    with pytest.raises(UserError, match="unknown log-prob encoding 'q4'.*fp16"):
        get_encoding("q4")
