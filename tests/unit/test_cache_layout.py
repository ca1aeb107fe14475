"""The position convention and the metadata dataclasses of the cache format."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st

from cache_schema import CacheReader, CacheStore, PartMeta, RootMeta, SampleRows, stored_positions
from cache_schema.format import SCHEMA_VERSION
from cache_schema.synthetic import example_root_meta, zipf_topk_rows
from common.errors import UserError


def test_stored_positions_by_hand():
    #          t:  0      1      2     3     4      5
    mask = np.array([False, False, True, True, False, True])
    # row t predicts token t+1: rows where the NEXT token is an assistant token
    assert stored_positions(mask, "assistant").tolist() == [1, 2, 4]
    assert stored_positions(mask, "all").tolist() == [0, 1, 2, 3, 4]
    assert stored_positions(np.array([True]), "all").tolist() == []
    assert stored_positions(np.array([True]), "assistant").tolist() == []
    assert stored_positions(mask, "assistant").dtype == np.uint32
    with pytest.raises(UserError, match="positions mode"):
        stored_positions(mask, "tool")


@given(st.lists(st.booleans(), min_size=1, max_size=200))
def test_stored_positions_predict_the_next_token(bits):
    mask = np.array(bits)
    pos = stored_positions(mask, "assistant").astype(np.int64)
    assert (pos < len(mask) - 1).all()
    assert mask[pos + 1].all()
    assert len(pos) == int(mask[1:].sum())
    assert (np.diff(pos) > 0).all()
    assert len(stored_positions(mask, "all")) == len(mask) - 1


def test_writer_refuses_rows_at_the_assistant_tokens_themselves(tmp_path):
    """The classic off-by-one: rows at the assistant tokens instead of at the tokens before them."""
    rng = np.random.default_rng(0)
    store = CacheStore.create_or_open(str(tmp_path / "c.zarr"), example_root_meta(num_shards=1))
    mask = np.zeros(12, dtype=bool)
    mask[5:9] = True
    wrong = np.flatnonzero(mask).astype(np.uint32)  # [5..8]; the convention wants [4..7]
    ids, lp = zipf_topk_rows(rng, len(wrong), 8, 1000)
    bad = SampleRows(sample_id="s0", input_ids=np.arange(12), loss_mask=mask, prompt_ids=np.arange(3),
                     positions=wrong, topk_ids=ids, topk_logprobs=lp)
    with pytest.raises(UserError, match=r"'s0'.*t\+1"):
        with store.open_part_writer(0, "me") as w:
            w.add(bad)


def test_root_meta_round_trip_and_identity():
    meta = example_root_meta(k=16, config={"teacher": {"model": "x"}, "lr": 0.1})
    again = RootMeta.from_dict(meta.to_dict(), where="test")
    assert again == meta
    assert meta.mismatches(again) == []
    other = example_root_meta(k=32)
    assert ("k", 16, 32) in meta.mismatches(other)
    # the engine version may change between runs; it is recorded per part instead
    from dataclasses import replace

    newer_engine = replace(meta, teacher=replace(meta.teacher, engine_version="vllm 9"))
    assert meta.mismatches(newer_engine) == []
    # nested metadata may be given as plain mappings; they are checked and converted
    from_mappings = replace(meta, teacher=meta.teacher.to_dict(), tokenizer=meta.tokenizer.to_dict())
    assert from_mappings == meta
    with pytest.raises(UserError, match="teacher: missing attribute 'backend'"):
        replace(meta, teacher={k: v for k, v in meta.teacher.to_dict().items() if k != "backend"})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": "8"}, "'k' must be int"),
        ({"k": True}, "'k' must be int"),
        ({"encoding": "int3"}, "unknown log-prob encoding 'int3'"),
        ({"positions": "tools"}, "positions must be one of"),
        ({"num_shards": 0}, "num_shards must be >= 1"),
        ({"vocab_size": 4}, "k=8 exceeds vocab_size=4"),
        ({"teacher": {"model": "m"}}, "teacher: missing attribute 'dtype'"),
    ],
)
def test_root_meta_parse_errors_name_the_field(change, message):
    d = example_root_meta().to_dict()
    d.update(change)
    with pytest.raises(UserError, match=message):
        RootMeta.from_dict(d, where="cache X")


def test_part_meta_round_trip_and_checks():
    pm = PartMeta(complete=True, shard=3, owner="o", k=8, encoding="fp16", n_samples=2, n_tokens=10, n_prompt_tokens=4,
                  n_rows=5, config_hash="abc", engine_version="e", timings={"teacher_s": 1.5}, extra={"note": "x"})
    assert PartMeta.from_dict(pm.to_dict(), where="p") == pm
    bad = {**pm.to_dict(), "n_rows": -1}
    with pytest.raises(UserError, match="n_rows"):
        PartMeta.from_dict(bad, where="p")
    with pytest.raises(UserError, match="missing attribute 'complete'"):
        PartMeta.from_dict({k: v for k, v in pm.to_dict().items() if k != "complete"}, where="p")


@pytest.mark.parametrize("version, relation", [(SCHEMA_VERSION + 1, "newer"), (SCHEMA_VERSION - 1, "older")])
def test_other_schema_version_refused_on_open(tmp_path, version, relation):
    path = str(tmp_path / "c.zarr")
    CacheStore.create_or_open(path, example_root_meta())
    group = zarr.open_group(path, mode="r+")
    group.update_attributes({"schema_version": version})
    for opener in (lambda: CacheReader(path), lambda: CacheStore.create_or_open(path, example_root_meta())):
        with pytest.raises(UserError) as e:
            opener()
        text = str(e.value)
        assert path in text and f"schema_version {version}" in text and f"code's {SCHEMA_VERSION}" in text
        assert relation in text
