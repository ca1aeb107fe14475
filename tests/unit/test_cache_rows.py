"""Whole top-K rows through every encoding, at fixed and mass-adaptive K: error bounds after renormalisation,
exact ids and tails, the padding convention (and what stage 2's loss makes of it), and `cache verify` on
the new layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_schema import (
    ENCODINGS, CacheReader, CacheStore, SampleRows, cache_stats, get_encoding, inspect_cache, verify_cache,
)
from hyperdistill.cli import cache
from cache_schema.format import PAD_LOGPROB
from cache_schema.topk_rows import IdTable, decode_rows, encode_rows, keep_counts, pad_ids
from cache_schema.synthetic import example_root_meta, synthetic_sample, zipf_topk_rows
from common.errors import UserError
from stage2_student.losses import TEACHER_LOGP_FLOOR, teacher_buckets

VOCAB = 1000


@st.composite
def teacher_rows(draw, max_k: int = 12):
    """(ids uint32 [R, K], float32 log-probs [R, K]) in rank order, each row summing to 1 - tail with tails
    from 0 to 0.9, values from near 0 down to about -60 (and ties)."""
    k = draw(st.integers(1, max_k))
    rows = draw(st.integers(0, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = -np.sort(rng.exponential(draw(st.sampled_from([0.05, 1.0, 6.0])), size=(rows, k)), axis=1)
    if draw(st.booleans()):  # equal teacher values
        logits[:, k // 2 :] = logits[:, k // 2 : k // 2 + 1]
    tail = draw(st.sampled_from([0.0, 1e-9, 1e-4, 0.02, 0.9]))
    lse = np.log(np.exp(logits).sum(axis=1, keepdims=True))
    lp = (logits - lse + np.log1p(-tail)).astype(np.float32)
    lp = np.minimum(lp, 0.0)
    ids = np.array([rng.choice(VOCAB, size=k, replace=False) for _ in range(rows)], np.uint32).reshape(rows, k)
    return ids, lp


def decoded_by_id(d, r: int) -> dict[int, float]:
    n = int(d.counts[r])
    return dict(zip(d.ids[r, :n].tolist(), d.logprobs[r, :n].astype(np.float64).tolist()))


@pytest.mark.parametrize("name", sorted(ENCODINGS))
@pytest.mark.parametrize("epsilon", [None, 0.05, 1e-3])
@settings(max_examples=60, deadline=None)
@given(data=teacher_rows())
def test_rows_round_trip_within_bounds_with_the_exact_tail(name, epsilon, data):
    ids, lp = data
    enc = get_encoding(name)
    exact_mass = enc.delta_coded or epsilon is not None
    # an id table made from some of the rows only, so that ids outside it (escaped) occur too
    table = IdTable.from_ids(ids[: len(ids) // 2])
    stored = encode_rows(ids, lp, enc, epsilon=epsilon, exact_mass=exact_mass, id_table=table)
    d = decode_rows(stored, enc, lp.shape[1], VOCAB, id_table=table, detail=True)
    rows, k = lp.shape
    assert d.ids.shape == d.logprobs.shape == (rows, k) and d.logprobs.dtype == np.float32
    x = lp.astype(np.float64)
    p = np.exp(x)
    want_counts = keep_counts(lp, epsilon) if epsilon is not None else np.full(rows, k)
    assert np.array_equal(d.counts, want_counts)
    bound = d.error_bound(enc)
    for r in range(rows):
        n = int(d.counts[r])
        got = decoded_by_id(d, r)
        assert sorted(got) == sorted(ids[r, :n].tolist())  # exactly the teacher's top n ids
        for j in range(n):
            err = abs(got[int(ids[r, j])] - x[r, j])
            col = d.ids[r, :n].tolist().index(int(ids[r, j]))
            assert err <= bound[r, col]
            # the a-priori statement: twice the largest stated rounding error in the row
            if exact_mass:
                assert err <= 2 * enc.stated_bound(x[r, :n]).max() + 1e-5 + abs(x[r, j]) * 1e-6
        assert (np.diff(d.logprobs[r, :n]) <= 0).all() and (d.logprobs[r, :n] <= 0).all()
        assert (d.logprobs[r, n:] == PAD_LOGPROB).all()
        kept_tail = max(0.0, 1.0 - p[r, :n].sum())
        if exact_mass:
            # the tail is the teacher's, to float32 precision, and so is what the loss derives from the row
            assert d.tail[r] == pytest.approx(kept_tail, rel=1e-5, abs=1e-12)
            derived = 1.0 - np.exp(d.logprobs[r].astype(np.float64)).sum()
            assert derived == pytest.approx(kept_tail, abs=2e-6)


def test_keep_counts_is_the_shortest_prefix_covering_one_minus_epsilon():
    rng = np.random.default_rng(0)
    _, lp = zipf_topk_rows(rng, 300, 64, 151_936)
    p = np.exp(lp.astype(np.float64))
    for eps in (0.1, 1e-3, 1e-6):
        counts = keep_counts(lp, eps)
        for r in range(len(p)):
            n = next((i + 1 for i in range(64) if p[r, : i + 1].sum() >= 1 - eps), 64)
            assert counts[r] == n


def test_padding_ids_are_distinct_valid_and_unused():
    k, vocab = 6, 10
    ids = np.array([[3, 1, 0, 0, 0, 0], [9, 8, 4, 0, 0, 0], [5, 7, 9, 6, 2, 0], [1, 2, 3, 4, 5, 6]], np.int64)
    counts = np.array([2, 3, 5, 6])
    out = pad_ids(ids.copy(), counts, vocab)
    assert out[0].tolist() == [3, 1, 9, 8, 7, 6]  # the largest ids, descending
    assert out[1].tolist() == [9, 8, 4, 7, 6, 5]  # skipping the row's own
    assert out[2].tolist() == [5, 7, 9, 6, 2, 8]
    assert out[3].tolist() == [1, 2, 3, 4, 5, 6]
    for row in out:
        assert len(set(row.tolist())) == k and row.max() < vocab


def test_the_loss_sees_zero_mass_on_padding_and_the_kept_exact_tail():
    """stage2_student.losses.teacher_buckets on padded rows: the K - n padding buckets get exactly 0 teacher
    probability and the tail bucket gets the teacher's mass outside the kept entries."""
    rng = np.random.default_rng(1)
    ids, lp = zipf_topk_rows(rng, 200, 32, VOCAB)
    enc, table = get_encoding("qsqrt5"), IdTable.from_ids(ids)
    d = decode_rows(encode_rows(ids, lp, enc, epsilon=1e-2, exact_mass=True, id_table=table), enc, 32, VOCAB,
                    id_table=table)
    assert (d.counts < 32).any()
    assert (PAD_LOGPROB < TEACHER_LOGP_FLOOR) and np.exp(np.float32(TEACHER_LOGP_FLOOR)) == 0.0
    buckets = teacher_buckets(torch.from_numpy(d.logprobs)).double().exp().numpy()  # [R, K + 1]
    p = np.exp(lp.astype(np.float64))
    for r in range(len(lp)):
        n = int(d.counts[r])
        assert (buckets[r, n:32] == 0).all()
        assert buckets[r, 32] == pytest.approx(max(0.0, 1 - p[r, :n].sum()), rel=1e-3, abs=1e-6)
        assert buckets[r, :n].sum() == pytest.approx(p[r, :n].sum(), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Through the writer, reader and verify


def build(path: str, encoding: str, epsilon: float | None, k: int = 16, samples: int = 4):
    store = CacheStore.create_or_open(path, example_root_meta(k=k, vocab_size=VOCAB, num_shards=1,
                                                              encoding=encoding, mass_epsilon=epsilon))
    rng = np.random.default_rng(0)
    written = [synthetic_sample(rng, f"s{i}", n_tokens=int(rng.integers(40, 300)), k=k, vocab_size=VOCAB)
               for i in range(samples)]
    with store.open_part_writer(0, "test", chunk_bytes=4096) as w:
        for s in written:
            w.add(s)
    return written


@pytest.mark.parametrize("encoding, epsilon", [("qlog8", None), ("qsqrt5", None), ("qsqrt5", 1e-3), ("fp16", 0.01)])
def test_new_layouts_read_back_and_verify_clean(tmp_path, encoding, epsilon):
    path = str(tmp_path / "c.zarr")
    written = build(path, encoding, epsilon)
    reader = CacheReader(path)
    assert reader.meta.encoding == encoding and reader.meta.mass_epsilon == epsilon
    got = [reader[i] for i in range(len(written))]
    for s, g in zip(written, got):
        assert g.topk_ids.shape == (len(s.positions), 16)
        if epsilon is None:
            assert (g.topk_counts == 16).all()
        else:
            assert (g.topk_counts < 16).any()
    report = verify_cache(path)
    assert report.ok, [str(p) for p in report.problems]
    result = CliRunner().invoke(cache, ["verify", path])
    assert result.exit_code == 0 and "OK" in result.output

    info = inspect_cache(path)
    counts = np.concatenate([g.topk_counts for g in got])
    assert info["entries_per_row"] == pytest.approx(counts.mean())
    assert set(info["bytes_by_array"]) >= {"topk_ids", "topk_logprobs", "topk_logmass"}
    topk = sum(v for name, v in info["bytes_by_array"].items() if name.startswith("topk_") or name == "id_table")
    assert info["topk_bytes_per_row"] == pytest.approx(topk / len(counts))
    stats = cache_stats(path)
    tails = np.concatenate([g.tail_mass for g in got])
    assert stats["tail_mass"]["mean"] == pytest.approx(tails.mean(), rel=1e-4, abs=1e-9)
    shown = CliRunner().invoke(cache, ["show", path, "0", "--raw-ids", "--top", "16"])
    assert shown.exit_code == 0, shown.output
    first = next(line for line in shown.output.splitlines() if line.split()[0] == str(got[0].positions[0]))
    # t, next token, p(next), rank, tail, then "id p" for the row's real entries only
    assert len(first.split()) == 5 + 2 * int(got[0].topk_counts[0])


def _rewrite(path: str, array: str, start: int, change) -> None:
    a = zarr.open_array(f"{path}/parts/00000/{array}", mode="r+")
    a[start] = change(a[start])


def test_verify_names_a_wrong_row_mass(tmp_path):
    path = str(tmp_path / "c.zarr")
    written = build(path, "qsqrt5", None)
    _rewrite(path, "topk_logmass", len(written[0].positions), lambda m: m - 0.5)  # sample 1's first row
    checks = {(p.sample_id, p.check) for p in verify_cache(path).problems}
    assert checks == {("s1", "checksum"), ("s1", "logmass")}


def test_verify_names_counts_that_do_not_add_up(tmp_path):
    path = str(tmp_path / "c.zarr")
    build(path, "qlog8", 0.01)
    _rewrite(path, "topk_counts", 0, lambda n: n + 1)
    assert {(p.sample_id, p.check) for p in verify_cache(path).problems} == {("s0", "checksum"), ("s0", "counts")}


def test_verify_names_a_row_that_keeps_more_than_epsilon_needs(tmp_path):
    """Two rows whose top 3 of 8 entries hold 0.95 of the mass, at epsilon = 0.1: 3 entries each. Moving the
    boundary between them gives row 0 four entries (one more than 1 - epsilon needs)."""
    path = str(tmp_path / "c.zarr")
    store = CacheStore.create_or_open(path, example_root_meta(k=8, vocab_size=VOCAB, num_shards=1,
                                                              encoding="qlog8", mass_epsilon=0.1))
    probs = np.array([0.5, 0.3, 0.15, 0.03, 0.01, 0.005, 0.003, 0.002])
    row = SampleRows(sample_id="two-rows", input_ids=np.arange(3), loss_mask=np.array([False, True, True]),
                     prompt_ids=np.arange(2), positions=np.array([0, 1]),
                     topk_ids=np.stack([np.arange(8), np.arange(100, 108)]),
                     topk_logprobs=np.log(np.stack([probs, probs])).astype(np.float32))
    with store.open_part_writer(0, "test") as w:
        w.add(row)
    assert verify_cache(path).ok
    counts = zarr.open_array(f"{path}/parts/00000/topk_counts", mode="r+")
    assert counts[:].tolist() == [3, 3]
    counts[:] = [4, 2]
    problems = verify_cache(path).problems
    assert {p.check for p in problems} >= {"checksum", "mass_epsilon"}
    assert any(p.check == "mass_epsilon" and "more entries than needed" in p.detail and "position 0" in p.detail
               for p in problems)


def test_the_cache_refuses_a_second_run_with_another_epsilon(tmp_path):
    path = str(tmp_path / "c.zarr")
    CacheStore.create_or_open(path, example_root_meta(encoding="qsqrt5", mass_epsilon=1e-3))
    with pytest.raises(UserError, match="mass_epsilon is 0.001 in the cache but 0.01 in this run"):
        CacheStore.create_or_open(path, example_root_meta(encoding="qsqrt5", mass_epsilon=1e-2))
    with pytest.raises(UserError, match="mass_epsilon must be a number in \\(0, 1\\)"):
        example_root_meta(mass_epsilon=1.5)


def test_id_table_ranks_by_frequency_and_escapes_the_rest():
    table = IdTable.from_ids(np.array([[7, 3, 9], [3, 9, 2], [3, 11, 9]]))
    assert table.table.tolist() == [3, 9, 2, 7, 11]  # by count, ties by id
    ids = np.array([3, 9, 2, 7, 11, 0, 5, 999])
    symbols = table.to_symbols(ids)
    assert symbols.tolist() == [0, 1, 2, 3, 4, 5 + 0, 5 + 5, 5 + 999]
    assert np.array_equal(table.to_ids(symbols), ids)
    empty = IdTable.from_ids(np.empty(0))
    assert np.array_equal(empty.to_ids(empty.to_symbols(ids)), ids)


def test_a_part_stores_its_id_table_and_verify_ties_it_to_the_samples(tmp_path):
    path = str(tmp_path / "c.zarr")
    written = build(path, "qsqrt5", None)
    part = CacheReader(path).part_of(0)
    counts = np.unique(np.concatenate([s.topk_ids.ravel() for s in written]), return_counts=True)
    assert part.id_table.table[0] == counts[0][np.argmax(counts[1])]  # the most frequent id first
    assert sorted(part.id_table.table.tolist()) == counts[0].tolist()
    table = zarr.open_array(f"{path}/parts/00000/id_table", mode="r+")
    swapped = table[:]
    swapped[[0, 1]] = swapped[[1, 0]]
    table[:] = swapped  # valid bytes, wrong meaning: every sample's ids would change
    problems = verify_cache(path).problems
    assert {p.check for p in problems} >= {"checksum"}
    assert {p.sample_id for p in problems} == {s.sample_id for s in written}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_rows_far_below_float64_range_keep_a_finite_mass(name):
    """exp(-800) is 0 even in float64: the row mass is computed relative to the row's top entry."""
    lp = np.array([[-800.0, -800.5, -801.0, -900.0]], np.float32)
    ids = np.array([[5, 6, 7, 8]], np.uint32)
    enc, table = get_encoding(name), IdTable.from_ids(ids)
    stored = encode_rows(ids, lp, enc, epsilon=1e-3, exact_mass=True, id_table=table)
    assert stored["topk_counts"].tolist() == [4]
    want = -800 + np.log(1 + np.exp(-0.5) + np.exp(-1.0) + np.exp(-100.0))
    assert stored["topk_logmass"][0] == pytest.approx(want, rel=1e-6)
    d = decode_rows(stored, enc, 4, VOCAB, id_table=table)
    assert np.isfinite(d.logprobs).all() and d.tail[0] == 1.0


@pytest.mark.parametrize("encoding, epsilon", [("fp16", 0.01), ("qlog8", None), ("qsqrt5", 0.01)])
def test_rows_summing_a_little_above_one_verify_clean(tmp_path, encoding, epsilon):
    """Float error in the teacher's log-softmax may put a row's sum at 1 + 1e-3 (the writer's tolerance):
    its stored mass is clamped to 1 (tail 0) and verify accepts it. (With fp16 the values' rounding bound,
    ~3e-4 here, is smaller than the clamp.)"""
    path = str(tmp_path / "c.zarr")
    store = CacheStore.create_or_open(path, example_root_meta(k=2, vocab_size=VOCAB, num_shards=1,
                                                              encoding=encoding, mass_epsilon=epsilon))
    probs = np.array([0.5009, 0.5])
    with store.open_part_writer(0, "test") as w:
        w.add(SampleRows(sample_id="over", input_ids=np.arange(2), loss_mask=np.array([False, True]),
                         prompt_ids=np.arange(1), positions=np.array([0]), topk_ids=np.array([[1, 2]]),
                         topk_logprobs=np.log(probs)[None].astype(np.float32)))
    report = verify_cache(path)
    assert report.ok, [str(p) for p in report.problems]
    s = CacheReader(path)[0]
    assert s.tail_mass[0] == 0.0 and np.exp(s.topk_logprobs.astype(np.float64)).sum() == pytest.approx(1, abs=1e-6)
