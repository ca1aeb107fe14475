"""The faster decode (cache_schema.topk_rows / encoding) and `flat_to_topk` against copies of the implementations
they replaced, kept here only as references: every output must be bit-identical, on realistic rows and on
adversarial stored arrays (wrapping sums, huge codes, long runs, escaped ids, NaN/inf from corrupt input)."""

from __future__ import annotations

import array
from dataclasses import dataclass, fields

import numpy as np
import pytest

from cache_schema.encoding import ENCODINGS, Fp16Encoding
from cache_schema.format import PAD_LOGPROB, TOPK_COUNTS, TOPK_IDS, TOPK_LOGMASS, TOPK_LOGPROBS, tail_mass
from cache_schema.topk_rows import DecodedRows, IdTable, decode_rows, encode_rows, pad_ids
from cache_schema.synthetic import zipf_topk_rows

VOCAB = 151_936
K = 128


# ---------------------------------------------------------------------------------------------
# The replaced implementations (as of the previous revision), as references


def _old_decode_codes(enc, codes):
    if isinstance(enc, Fp16Encoding):
        return codes.astype(np.float32)
    if enc.uniform:
        return codes.astype(np.float32) * np.float32(-enc.step)
    return enc._tables[1][np.minimum(codes, enc.max_code)]


def _old_undo_runs(stored, code_steps):
    rows, k = stored.shape
    flat = stored.ravel()
    starts = (code_steps > 0).ravel()
    starts[::k] = True
    total = np.cumsum(flat, dtype=np.uint32)
    run = np.cumsum(starts, dtype=np.int32)
    run -= 1
    first = np.flatnonzero(starts)
    before = total[first] - flat[first]
    return (total - before[run]).reshape(rows, k).astype(np.int64)


def _old_to_ids(table: IdTable, symbols):
    d = len(table.table)
    ids64 = table.table.astype(np.int64)
    return np.where(symbols < d, ids64[np.clip(symbols, 0, d - 1)] if d else 0, symbols - d)


def old_decode_rows(stored, enc, k, vocab_size, id_table=None):
    """(ids, logprobs, counts, tail, codes, raw, shift, symbols) as the replaced decode_rows(detail=True)
    computed them, in one piece (its blocks changed nothing but speed)."""
    counts = stored.get(TOPK_COUNTS)
    ids, codes = stored[TOPK_IDS], stored[TOPK_LOGPROBS]
    logmass = stored.get(TOPK_LOGMASS)
    valid = None
    if counts is None:
        counts = np.full(len(ids), k, dtype=np.int64)
    else:
        counts = counts.astype(np.int64)
        valid = np.arange(k) < counts[:, None]
        ids_, codes_ = np.zeros((len(counts), k), ids.dtype), np.zeros((len(counts), k), codes.dtype)
        ids_[valid], codes_[valid] = ids, codes
        ids, codes = ids_, codes_
    symbols = None
    if enc.delta_coded:
        symbols = _old_undo_runs(ids, codes)
        out_ids = _old_to_ids(id_table, symbols)
        codes = np.cumsum(codes, axis=1, dtype=np.uint32)
    else:
        out_ids = ids.astype(np.int64)
    raw = _old_decode_codes(enc, codes)
    if valid is not None:
        raw[~valid] = PAD_LOGPROB
    shift = None
    if logmass is None:
        values, tail = raw.copy(), tail_mass(raw)
    else:
        top = raw[:, 0] if enc.delta_coded else raw.max(axis=1)
        lse = top + np.log(np.exp(raw - top[:, None]).sum(axis=1))
        shift = (logmass - lse).astype(np.float32)
        values = raw + shift[:, None]
        tail = np.clip(-np.expm1(logmass), 0.0, 1.0)
    if valid is not None:
        pad_ids(out_ids, counts, vocab_size, clean=True)
    return dict(ids=out_ids, logprobs=values, counts=counts, tail=tail, codes=codes, raw=raw, shift=shift,
                symbols=symbols)


def assert_same_bits(new: DecodedRows, old: dict) -> None:
    for f in fields(new):
        got, want = getattr(new, f.name), old[f.name]
        assert (got is None) == (want is None), f.name
        if got is None:
            continue
        want = np.asarray(want, dtype=got.dtype) if f.name in ("codes",) else want
        assert got.shape == want.shape, f.name
        if f.name != "codes":
            assert got.dtype == want.dtype, f.name
        # Bytes, not values: NaN == NaN and -0.0 != 0.0 here.
        assert np.array_equal(np.ascontiguousarray(got).view(np.uint8), np.ascontiguousarray(want).view(np.uint8)), \
            f.name


# ---------------------------------------------------------------------------------------------
# decode_rows


@pytest.mark.parametrize("epsilon", [None, 1e-3])
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_decode_matches_the_replaced_one_on_teacher_like_rows(name, epsilon):
    enc = ENCODINGS[name]
    rng = np.random.default_rng(7)
    ids, lp = zipf_topk_rows(rng, 700, K, VOCAB)  # 700 rows: several blocks and a partial one
    lp[5, 60:] = lp[5, 60]  # a long run of ties
    table = IdTable.from_ids(ids[:300]) if enc.delta_coded else None  # later rows hold escaped ids
    exact = epsilon is not None or enc.delta_coded
    stored = encode_rows(ids, lp, enc, epsilon=epsilon, exact_mass=exact, id_table=table)
    new = decode_rows(stored, enc, K, VOCAB, id_table=table, detail=True)
    assert_same_bits(new, old_decode_rows(stored, enc, K, VOCAB, table))
    fast = decode_rows(stored, enc, K, VOCAB, id_table=table)
    assert np.array_equal(fast.ids, new.ids) and np.array_equal(fast.logprobs.view(np.uint32),
                                                                 new.logprobs.view(np.uint32))


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_decode_matches_the_replaced_one_on_adversarial_arrays(name, ragged):
    """Arbitrary stored bytes (as corruption that passed the crc would give): huge steps whose sums wrap
    in uint32, codes past max_code, all-zero steps (one run per row), symbols past the table (escapes)."""
    enc = ENCODINGS[name]
    rng = np.random.default_rng(11 + ragged)
    rows, k = 300, 16
    table = IdTable.from_ids(rng.integers(0, 50, 200)) if enc.delta_coded else None
    counts = rng.integers(1, k + 1, rows) if ragged else np.full(rows, k)
    n = int(counts.sum())
    kinds = [rng.integers(0, 2**32, n, dtype=np.uint32), rng.integers(0, 4, n, dtype=np.uint32),
             np.zeros(n, dtype=np.uint32), rng.integers(0, 60, n, dtype=np.uint32)]
    for ids, steps in [(a, b) for a in kinds for b in kinds]:
        if enc.delta_coded:
            codes = steps
        else:  # any float16 bit pattern, NaN and inf included
            codes = rng.integers(0, 2**16, n, dtype=np.uint16).view(np.float16)
        stored = {TOPK_IDS: ids, TOPK_LOGPROBS: codes}
        if ragged:
            stored[TOPK_COUNTS] = counts.astype(np.uint32)
        else:
            stored = {key: v.reshape(rows, k) for key, v in stored.items()}
        if ragged or enc.delta_coded:
            stored[TOPK_LOGMASS] = -rng.exponential(1.0, rows).astype(np.float32)
        with np.errstate(all="ignore"):
            new = decode_rows(stored, enc, k, VOCAB, id_table=table, detail=True)
            old = old_decode_rows(stored, enc, k, VOCAB, table)
        assert_same_bits(new, old)


def test_uniform_decode_into_out_matches_a_fresh_array():
    enc = ENCODINGS["qlog8"]
    codes = np.array([[0, 1, 2**24 + 1, 2**32 - 1]], dtype=np.uint32)
    out = np.full(codes.shape, np.nan, dtype=np.float32)
    assert enc.decode(codes, out=out) is out
    np.testing.assert_array_equal(out, codes.astype(np.float64).astype(np.float32) * np.float32(-2.0**-8))


# ---------------------------------------------------------------------------------------------
# flat_to_topk


@dataclass
class FakeFlatLogprobs:
    """vLLM's FlatLogprobs fields as the engine fills them (see stage1_teacher.vllm_backend's docstring)."""

    token_ids: list
    logprobs: list
    start_indices: list
    end_indices: list


def fake_flat(rng, n_positions: int, k: int) -> FakeFlatLogprobs:
    width = k + 1
    ids = rng.integers(0, 5000, (n_positions - 1, width)).astype(np.uint32)
    lps = -np.sort(rng.exponential(2.0, (n_positions - 1, width)), axis=1).astype(np.float32)
    lps[:, 0] = -rng.exponential(5.0, n_positions - 1)  # the prompt token: any value
    return FakeFlatLogprobs(
        token_ids=ids.ravel().tolist(), logprobs=lps.ravel().tolist(),
        start_indices=[0] + [p * width for p in range(n_positions - 1)],
        end_indices=[0] + [(p + 1) * width for p in range(n_positions - 1)],
    )


def old_flat_to_topk(flat, positions, k):
    n_rows = positions[-1] + 1
    n_flat = n_rows * (k + 1)
    ids = np.frombuffer(array.array("I", flat.token_ids[:n_flat]), dtype=np.uintc)
    lps = np.frombuffer(array.array("f", flat.logprobs[:n_flat]), dtype=np.float32)
    ids = ids.reshape(n_rows, k + 1)[positions, 1:].astype(np.uint32, copy=False)
    lps = lps.reshape(n_rows, k + 1)[positions, 1:]
    return np.ascontiguousarray(ids), np.ascontiguousarray(lps)


@pytest.mark.parametrize("positions", [
    [0], [7], [0, 1, 2, 3], [2, 3, 4, 9, 10, 30, 31, 32, 33, 58], [5, 40], list(range(0, 59, 2)), [58],
])
def test_flat_to_topk_matches_the_replaced_conversion(positions):
    from stage1_teacher.vllm_backend import flat_to_topk

    k = 6
    flat = fake_flat(np.random.default_rng(len(positions)), 60, k)
    pos = np.array(positions, dtype=np.int64)
    ids, lps = flat_to_topk(flat, pos, k)[:2]
    want_ids, want_lps = old_flat_to_topk(flat, pos, k)
    assert ids.dtype == np.uint32 and lps.dtype == np.float32
    assert np.array_equal(ids, want_ids) and np.array_equal(lps.view(np.uint32), want_lps.view(np.uint32))
    assert ids.flags.c_contiguous and lps.flags.c_contiguous


@pytest.mark.parametrize("break_at", ["start", "end", "short"])
def test_flat_to_topk_refuses_a_changed_layout_at_a_requested_row(break_at):
    from stage1_teacher.vllm_backend import flat_to_topk

    k = 4
    flat = fake_flat(np.random.default_rng(0), 20, k)
    pos = np.array([3, 4, 12])
    if break_at == "start":
        flat.start_indices[13] += 1  # row 12 = prompt position 13
    elif break_at == "end":
        flat.end_indices[5] -= 1  # row 4: K entries, no prompt token
    else:
        pos = np.array([3, 19])  # row 19 would need prompt position 20 of 20
    with pytest.raises(RuntimeError, match="prompt log-probs"):
        flat_to_topk(flat, pos, k)
