"""Writer -> reader round trips (local paths and memory:// URLs), random access, and DataLoader workers."""

from __future__ import annotations

import copy
import pickle
import uuid
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_schema import ENCODINGS, CacheReader, CacheStore, SampleRows, get_encoding, stored_positions
from cache_schema.topk_rows import decode_rows, encode_rows
from cache_schema.synthetic import example_root_meta, synthetic_sample, zipf_topk_rows

VOCAB = 1000


@st.composite
def samples(draw, k: int, mode: str):
    """A sample with T >= 1 tokens; some have no rows at all (T=1, or no assistant token after t=0)."""
    n_tokens = draw(st.integers(1, 60))
    mask = np.array(draw(st.lists(st.booleans(), min_size=n_tokens, max_size=n_tokens)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    pos = stored_positions(mask, mode)
    ids, lp = zipf_topk_rows(rng, len(pos), k, VOCAB)
    return SampleRows(sample_id=f"s-{seed}-{n_tokens}", input_ids=rng.integers(0, VOCAB, n_tokens), loss_mask=mask,
                      prompt_ids=rng.integers(0, VOCAB, draw(st.integers(0, 7))), positions=pos, topk_ids=ids,
                      topk_logprobs=lp)


def assert_same(got, want: SampleRows, k: int, encoding: str = "fp16", epsilon: float | None = None,
                id_table=None) -> None:
    """The reader returns exactly what the in-memory row codec makes of the written rows (its error bounds
    are tested in test_cache_encoding / test_cache_rows); everything else comes back unchanged. `id_table`:
    the sample's part's (quantised encodings)."""
    assert got.sample_id == want.sample_id
    assert got.input_ids.dtype == np.int64 and np.array_equal(got.input_ids, want.input_ids)
    assert got.loss_mask.dtype == np.bool_ and np.array_equal(got.loss_mask, want.loss_mask)
    assert got.prompt_ids.dtype == np.int64 and np.array_equal(got.prompt_ids, want.prompt_ids)
    assert got.positions.dtype == np.int64 and np.array_equal(got.positions, want.positions)
    rows = len(want.positions)
    assert got.topk_ids.dtype == np.int64 and got.topk_ids.shape == (rows, k)
    assert got.topk_logprobs.dtype == np.float32 and got.topk_logprobs.shape == (rows, k)
    assert got.topk_counts.shape == got.tail_mass.shape == (rows,)
    enc = get_encoding(encoding)
    lp = np.asarray(want.topk_logprobs, dtype=np.float32)
    exact_mass = enc.delta_coded or epsilon is not None
    stored = encode_rows(np.asarray(want.topk_ids, np.uint32), lp, enc, epsilon=epsilon, exact_mass=exact_mass,
                         id_table=id_table)
    expected = decode_rows(stored, enc, k, VOCAB, id_table=id_table)
    assert np.array_equal(got.topk_ids, expected.ids)
    assert np.array_equal(got.topk_logprobs, expected.logprobs)
    assert np.array_equal(got.topk_counts, expected.counts) and np.array_equal(got.tail_mass, expected.tail)
    if encoding == "fp16" and epsilon is None:  # the original layout: rank order and values as fp16
        assert np.array_equal(got.topk_ids, want.topk_ids) and (got.topk_counts == k).all()
        assert (np.abs(got.topk_logprobs - lp) <= enc.error_bound(lp)).all()
        tail = 1.0 - np.exp(got.topk_logprobs.astype(np.float64)).sum(axis=1)
        assert np.allclose(got.tail_mass, np.clip(tail, 0, 1), atol=1e-6)
    else:  # the teacher's tail, kept exactly
        keep = np.arange(k) < got.topk_counts[:, None]
        teacher_tail = np.clip(1.0 - np.where(keep, np.exp(lp.astype(np.float64)), 0).sum(axis=1), 0, 1)
        assert np.allclose(got.tail_mass, teacher_tail, rtol=1e-5, atol=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), k=st.sampled_from([1, 3, 8]), mode=st.sampled_from(["assistant", "all"]),
       n_shards=st.integers(1, 2), chunk_bytes=st.sampled_from([128, 1024, 1 << 20]),
       encoding=st.sampled_from(sorted(ENCODINGS)), epsilon=st.sampled_from([None, 0.3, 1e-3]))
def test_write_then_read_gives_the_same_samples(data, k, mode, n_shards, chunk_bytes, encoding, epsilon):
    """Every encoding, fixed and mass-adaptive K. Tiny chunk sizes make samples straddle chunks and flushes;
    memory:// keeps examples fast."""
    path = f"memory://roundtrip-{uuid.uuid4().hex}/cache.zarr"
    meta = example_root_meta(k=k, vocab_size=VOCAB, num_shards=n_shards, positions=mode, encoding=encoding,
                             mass_epsilon=epsilon)
    store = CacheStore.create_or_open(path, meta)
    by_shard = {}
    for shard in range(n_shards):
        drawn = data.draw(st.lists(samples(k, mode), max_size=5))
        drawn = [replace(s, sample_id=f"{shard}/{i}/{s.sample_id}") for i, s in enumerate(drawn)]
        by_shard[shard] = drawn
        with store.open_part_writer(shard, owner="test", chunk_bytes=chunk_bytes) as w:
            for s in drawn:
                w.add(s)
    reader = CacheReader(path)
    expected = [s for shard in range(n_shards) for s in by_shard[shard]]
    assert len(reader) == len(expected)
    assert reader.sample_ids == [s.sample_id for s in expected]
    for i in np.random.default_rng(0).permutation(len(expected)):  # random access order
        id_table = reader.part_of(reader.locate(int(i))[0]).id_table
        assert (id_table is not None) == get_encoding(encoding).delta_coded
        assert_same(reader[int(i)], expected[i], k, encoding, epsilon, id_table)
        assert reader.index_of(expected[i].sample_id) == i
        prompt = reader.prompt_ids(int(i))  # the prompt alone, as the hypernetwork's calibration reads it
        assert prompt.dtype == np.int64 and np.array_equal(prompt, expected[i].prompt_ids)


def write_cache(path: str, n_shards: int = 2, per_shard: int = 5, k: int = 8, seed: int = 0) -> list[SampleRows]:
    rng = np.random.default_rng(seed)
    store = CacheStore.create_or_open(path, example_root_meta(k=k, vocab_size=VOCAB, num_shards=n_shards))
    written = []
    for shard in range(n_shards):
        with store.open_part_writer(shard, owner="test", chunk_bytes=2048) as w:
            for i in range(per_shard):
                n_tokens = int(rng.integers(2, 400))
                s = synthetic_sample(rng, f"traj-{shard}-{i}", n_tokens=n_tokens, k=k, vocab_size=VOCAB)
                w.add(s)
                written.append(s)
    return written


def test_local_path_round_trip_and_status(tmp_path):
    path = str(tmp_path / "cache.zarr")
    written = write_cache(path)
    reader = CacheReader(path)
    assert reader.part_status == {0: "complete", 1: "complete"}
    assert reader.meta.k == 8 and len(reader) == len(written)
    for i, s in enumerate(written):
        assert_same(reader[i], s, 8)
    assert_same(reader[-1], written[-1], 8)
    with pytest.raises(IndexError):
        reader[len(written)]
    with pytest.raises(KeyError):
        reader.index_of("nope")


def test_reader_pickles_as_its_path(tmp_path):
    path = str(tmp_path / "cache.zarr")
    written = write_cache(path)
    reader = CacheReader(path)
    assert len(pickle.dumps(reader)) < 1000  # the path and the list of parts, no arrays or handles
    again = copy.deepcopy(reader)  # the same __getstate__ / __setstate__ round trip that spawn workers use
    assert again._pid is None  # reopens lazily in whichever process uses it
    assert again.meta == reader.meta and again.part_status == reader.part_status
    assert again.sample_ids == reader.sample_ids
    assert_same(again[3], written[3], 8)


def _collate(batch):
    return [(s.sample_id, s.topk_ids.sum(), float(s.topk_logprobs.sum()), s.input_ids.sum()) for s in batch]


def test_reader_inside_dataloader_workers(tmp_path):
    path = str(tmp_path / "cache.zarr")
    write_cache(path, per_shard=6)
    reader = CacheReader(path)
    reader[0]  # the parent has open handles and cached chunks before the workers fork
    loader = torch.utils.data.DataLoader(reader, batch_size=3, num_workers=2, collate_fn=_collate, shuffle=False)
    got = [row for batch in loader for row in batch]
    want = [_collate([reader[i]])[0] for i in range(len(reader))]
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g[1] == w[1] and g[3] == w[3] and g[2] == pytest.approx(w[2])
