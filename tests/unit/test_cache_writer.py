"""Writer semantics: metadata agreement, sample validation, resume after a failed writer, completion."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from cache_schema import CacheReader, CacheStore, LeaseLost, SampleRows, config_hash
from cache_schema.format import LEASE_FILE, part_path
from cache_schema.synthetic import example_root_meta, synthetic_sample
from common.errors import UserError

VOCAB = 1000


def sample(seed: int, sample_id: str, n_tokens: int = 50, k: int = 8) -> SampleRows:
    return synthetic_sample(np.random.default_rng(seed), sample_id, n_tokens=n_tokens, k=k, vocab_size=VOCAB)


@pytest.fixture
def store(tmp_path):
    return CacheStore.create_or_open(str(tmp_path / "c.zarr"), example_root_meta(num_shards=3))


@pytest.mark.parametrize(
    "change, field, have, want",
    [
        ({"k": 16}, "k", 8, 16),
        ({"positions": "all"}, "positions", "assistant", "all"),
        ({"num_shards": 4}, "num_shards", 3, 4),
        ({"chat_template_fingerprint": "tmpl-1"}, "chat_template_fingerprint", "tmpl-0", "tmpl-1"),
    ],
)
def test_reopening_with_other_settings_is_refused(store, change, field, have, want):
    other = replace(example_root_meta(num_shards=3), **change)
    with pytest.raises(UserError) as e:
        CacheStore.create_or_open(store.path, other)
    msg = str(e.value)
    assert "\n" not in msg and store.path in msg
    assert f"{field} is {have!r} in the cache but {want!r} in this run" in msg


def test_reopening_with_another_teacher_or_tokenizer_is_refused(store):
    base = example_root_meta(num_shards=3)
    for other, field in [
        (replace(base, teacher=replace(base.teacher, model="bigger")), "teacher.model"),
        (replace(base, tokenizer=replace(base.tokenizer, fingerprint="tok-9")), "tokenizer.fingerprint"),
        (replace(base, dataset=replace(base.dataset, fingerprint="data-9")), "dataset.fingerprint"),
    ]:
        with pytest.raises(UserError, match=f"{field} is"):
            CacheStore.create_or_open(store.path, other)


def test_reopening_with_the_same_identity_keeps_the_stored_meta(store):
    run = example_root_meta(num_shards=3, config={"run": 2})
    again = CacheStore.create_or_open(store.path, run)
    assert again.meta.config == {"name": "synthetic"}  # what the creating run stored
    with again.open_part_writer(0, "me") as w:
        w.add(sample(0, "a"))
    assert CacheReader(store.path).part_of(0).part_meta.config_hash == config_hash({"run": 2})


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="exists and is not a cache"):
        CacheStore.create_or_open(str(tmp_path), example_root_meta())


def test_part_status_and_resume_after_a_failed_writer(store):
    assert store.part_status(1) == "missing"
    with pytest.raises(RuntimeError, match="teacher died"):
        with store.open_part_writer(1, "first") as w:
            for i in range(4):
                w.add(sample(i, f"old-{i}"))
            raise RuntimeError("teacher died")
    assert store.part_status(1) == "incomplete"
    reader = CacheReader(store.path)
    assert len(reader) == 0 and reader.part_status[1] == "incomplete"
    with store.open_part_writer(1, "second") as w:
        w.add(sample(7, "new-0"))
        w.add(sample(8, "new-1"))
    assert store.part_status(1) == "complete"
    reader = CacheReader(store.path)
    assert reader.sample_ids == ["new-0", "new-1"]  # nothing left from the failed writer
    assert reader.part_of(1).part_meta.owner == "second"
    assert not store.location.exists(f"{part_path(1)}/{LEASE_FILE}")  # released
    with pytest.raises(UserError, match="out of range"):
        store.part_status(3)


def test_finish_records_counts_timings_and_extra_attrs(store):
    samples = [sample(i, f"s{i}", n_tokens=30 + i) for i in range(3)]
    with store.open_part_writer(2, "me") as w:
        for s in samples:
            w.add(s)
        meta = w.finish({"timings": {"teacher_s": 1.25}, "engine": {"batch_tokens": 4096}, "engine_version": "vllm 9"})
    assert meta.complete and meta.n_samples == 3
    assert meta.n_tokens == sum(len(s.input_ids) for s in samples)
    assert meta.n_rows == sum(len(s.positions) for s in samples)
    assert meta.n_prompt_tokens == sum(len(s.prompt_ids) for s in samples)
    stored = CacheReader(store.path).part_of(2).part_meta
    assert stored == meta
    assert stored.timings["teacher_s"] == 1.25 and stored.timings["writer_busy_s"] >= 0
    assert stored.extra == {"engine": {"batch_tokens": 4096}}
    assert stored.engine_version == "vllm 9" and stored.config_hash == config_hash({"name": "synthetic"})


def test_finish_refuses_to_override_the_counts(store):
    with pytest.raises(UserError, match="n_rows are written by the writer"):
        with store.open_part_writer(0, "me") as w:
            w.add(sample(0, "a"))
            w.finish({"n_rows": 0})
    assert store.part_status(0) == "incomplete"


def test_an_empty_part_is_complete(store):
    with store.open_part_writer(0, "me"):
        pass
    assert store.part_status(0) == "complete"
    assert len(CacheReader(store.path)) == 0


def _bad(change: dict, base: SampleRows | None = None) -> SampleRows:
    return replace(base or sample(0, "bad-one"), **change)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda s: {"topk_ids": s.topk_ids[:, :4]}, r"topk_ids has shape \(\d+, 4\), expected \(\d+, 8\)"),
        (lambda s: {"topk_ids": s.topk_ids + VOCAB}, "ids outside \\[0, 1000\\)"),
        (lambda s: {"topk_ids": np.repeat(s.topk_ids[:, :1], 8, axis=1)}, "a token id twice in a row"),
        (lambda s: {"topk_logprobs": np.full_like(s.topk_logprobs, -7e4)}, "below the fp16 encoding's minimum"),
        (lambda s: {"input_ids": np.append(s.input_ids[:-1], -1)}, "input_ids holds ids outside"),
        (lambda s: {"topk_logprobs": np.where(np.arange(8) == 3, np.nan, s.topk_logprobs).astype(np.float32)},
         "not finite"),
        (lambda s: {"topk_logprobs": s.topk_logprobs[:, ::-1].copy()}, "not in rank order"),
        (lambda s: {"topk_logprobs": s.topk_logprobs - s.topk_logprobs[:, :1] + 0.5}, "above 0"),
        (lambda s: {"topk_logprobs": np.full_like(s.topk_logprobs, np.log(0.5))}, "summing above 1"),
        (lambda s: {"topk_logprobs": s.topk_logprobs.astype(np.int32)}, "floating point"),
        (lambda s: {"positions": s.positions + 1}, "positions differ"),
        (lambda s: {"loss_mask": s.loss_mask[:-1]}, "loss_mask has shape"),
        (lambda s: {"input_ids": s.input_ids[:0], "loss_mask": s.loss_mask[:0]}, "input_ids is empty"),
    ],
)
def test_bad_samples_are_refused_naming_the_sample(store, make, message):
    good = sample(0, "bad-one", n_tokens=80)
    assert len(good.positions) > 0
    with pytest.raises(UserError, match=message) as e:
        with store.open_part_writer(0, "me") as w:
            w.add(_bad(make(good), good))
    assert "'bad-one'" in str(e.value) or "sample_id" in str(e.value)
    assert store.part_status(0) == "incomplete"


def test_duplicate_sample_in_a_part_is_refused(store):
    with pytest.raises(UserError, match="'dup': added twice"):
        with store.open_part_writer(0, "me") as w:
            w.add(sample(0, "dup"))
            w.add(sample(1, "dup"))


def test_part_is_not_marked_complete_when_the_lease_was_taken_over(store):
    with pytest.raises(LeaseLost):
        with store.open_part_writer(0, "me") as w:
            w.add(sample(0, "a"))
            lease_key = f"{part_path(0)}/{LEASE_FILE}"
            record = json.loads(store.location.read_bytes(lease_key))
            store.location.write_atomic(lease_key, json.dumps({**record, "token": "someone-else"}).encode())
    assert store.part_status(0) == "incomplete"
