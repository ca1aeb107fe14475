"""Stable sharding, prepare-data's manifest and summary, per-shard loading."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import RunConfig
from common.errors import UserError
from cache_schema.manifest import dataset_fingerprint, load_manifest, summary_path
from common.manifest import load_shard_samples, prepare_data
from common.sharding import is_heldout, shard_of

IDS = [f"nebius__traj-{i:05d}" for i in range(4000)]


# ---------------------------------------------------------------------------------------------
# Sharding


def test_shard_of_matches_an_independent_blake2b():
    for sample_id in ["oh-d359c0fc2cbe", "timewise__durations-37:sample-agent-a:77a4c511", "x", "ü-unicode"]:
        digest = hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8, person=b"hd-shard").digest()
        for n in (1, 3, 4, 64):
            assert shard_of(sample_id, n) == int.from_bytes(digest, "big") % n


def test_shard_and_heldout_do_not_depend_on_the_interpreter_hash_seed():
    code = (
        "from common.sharding import shard_of, is_heldout; "
        "print(([shard_of(f'id{i}', 7) for i in range(50)], [is_heldout(f'id{i}', 0.3) for i in range(50)]))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    here = ([shard_of(f"id{i}", 7) for i in range(50)], [is_heldout(f"id{i}", 0.3) for i in range(50)])
    assert outs.pop().strip() == str(here)


def test_shards_are_balanced():
    counts = [0] * 8
    for sample_id in IDS:
        counts[shard_of(sample_id, 8)] += 1
    assert sum(counts) == len(IDS)
    assert max(counts) < 1.15 * len(IDS) / 8 and min(counts) > 0.85 * len(IDS) / 8


def test_heldout_fraction_is_respected_and_independent_of_shards():
    held = [is_heldout(i, 0.125) for i in IDS]
    assert 0.105 < sum(held) / len(IDS) < 0.145
    # Independent of the shard hash: every shard holds out about the same fraction.
    for shard in range(4):
        members = [h for i, h in zip(IDS, held) if shard_of(i, 4) == shard]
        assert 0.09 < sum(members) / len(members) < 0.16
    assert not any(is_heldout(i, 0.0) for i in IDS)
    # Growing the fraction only adds samples to the held-out set.
    assert all(is_heldout(i, 0.3) for i in IDS if is_heldout(i, 0.1))


# ---------------------------------------------------------------------------------------------
# prepare-data on the bundled sample


def make_cfg(tmp_path: Path, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.manifest = str(tmp_path / "out" / "manifest.jsonl")
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, qwen_tokenizer):
    """prepare-data run once for this module; tests that change the config work on a copy."""
    cfg = make_cfg(tmp_path_factory.mktemp("prepared"), resolved_only=True, max_tokens=8192, num_shards=4,
                   heldout_fraction=0.25)
    return cfg, prepare_data(cfg, qwen_tokenizer)


def test_prepare_data_counts_add_up(prepared):
    cfg, summary = prepared
    rows = load_manifest(cfg.manifest)
    assert summary.rows_read == 27  # lines in data/sample/*.jsonl
    assert summary.kept + sum(summary.dropped.values()) == summary.rows_read
    # Written into the sample: 4 malformed rows, 1 duplicate id, 5 unresolved trajectories.
    assert summary.dropped == {"malformed": 4, "duplicate_id": 1, "unresolved": 5}
    assert len(rows) == summary.kept == 17
    assert sum(summary.per_shard) == summary.kept
    assert [sum(r["shard"] == s for r in rows) for s in range(4)] == summary.per_shard
    assert summary.heldout == sum(r["heldout"] for r in rows)
    assert summary.n_tokens == sum(r["n_tokens"] for r in rows)
    assert summary.n_assistant_tokens == sum(r["n_assistant_tokens"] for r in rows)
    assert summary.tokens_min == min(r["n_tokens"] for r in rows) >= 500
    assert summary.tokens_max == max(r["n_tokens"] for r in rows) <= 3000
    for r in rows:
        assert r["shard"] == shard_of(r["id"], 4) and r["heldout"] == is_heldout(r["id"], 0.25)
        assert 0 < r["n_assistant_tokens"] < r["n_tokens"] and 0 < r["n_prompt_tokens"] <= 512
        assert ":" in r["location"] and not r["truncated"]


def test_summary_file_and_fingerprint(prepared):
    cfg, summary = prepared
    manifest = Path(cfg.manifest)
    expected = "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert summary.fingerprint == dataset_fingerprint(manifest) == expected
    on_disk = json.loads(summary_path(manifest).read_text())
    assert on_disk["fingerprint"] == expected
    assert on_disk["kept"] == summary.kept and on_disk["dropped"] == summary.dropped
    assert on_disk["extra"]["tokenizer_fingerprint"].startswith("sha256:")
    text = summary.format()
    assert "27 rows read, 17 kept, 10 dropped" in text
    for reason in ("malformed", "duplicate_id", "unresolved"):
        assert reason in text
    assert "openhands.jsonl:4" in text and "'instance_id'" in text


def test_load_shard_samples_matches_the_manifest(prepared, qwen_tokenizer):
    cfg, _ = prepared
    rows = load_manifest(cfg.manifest)
    seen = []
    for shard in range(cfg.data.num_shards):
        samples = load_shard_samples(cfg, qwen_tokenizer, shard)
        expected = [r for r in rows if r["shard"] == shard]
        assert [s.sample_id for s in samples] == [r["id"] for r in expected]
        for s, r in zip(samples, expected):
            assert len(s.input_ids) == r["n_tokens"] and int(s.loss_mask.sum()) == r["n_assistant_tokens"]
        seen += [s.sample_id for s in samples]
    assert sorted(seen) == sorted(r["id"] for r in rows)
    with pytest.raises(UserError, match="shard 4"):
        load_shard_samples(cfg, qwen_tokenizer, 4)


def test_load_shard_samples_refuses_a_stale_manifest(prepared, qwen_tokenizer):
    cfg, summary = copy.deepcopy(prepared)
    cfg.data.max_tokens = summary.tokens_max - 1  # the longest sample would now be dropped
    with pytest.raises(UserError, match="re-run prepare-data"):
        for shard in range(cfg.data.num_shards):
            load_shard_samples(cfg, qwen_tokenizer, shard)


def test_prepare_data_truncate_versus_skip(tmp_path, qwen_tokenizer):
    limit = 2500
    base = prepare_data(make_cfg(tmp_path / "a", resolved_only=False), qwen_tokenizer)
    lengths = [r["n_tokens"] for r in load_manifest(base.manifest_path)]
    n_long = sum(n > limit for n in lengths)
    assert n_long > 0

    skip_cfg = make_cfg(tmp_path / "b", resolved_only=False, max_tokens=limit, overlong="skip")
    skip = prepare_data(skip_cfg, qwen_tokenizer)
    assert skip.dropped["too_long"] == n_long and skip.kept == base.kept - n_long
    assert skip.tokens_max <= limit

    trunc_cfg = make_cfg(tmp_path / "c", resolved_only=False, max_tokens=limit, overlong="truncate")
    trunc = prepare_data(trunc_cfg, qwen_tokenizer)
    assert trunc.kept == base.kept and trunc.truncated == n_long and "too_long" not in trunc.dropped
    trunc_rows = load_manifest(trunc_cfg.manifest)
    assert [r["n_tokens"] for r in trunc_rows] == [min(n, limit) for n in lengths]
    assert sum(r["truncated"] for r in trunc_rows) == n_long


def test_prepare_data_with_nothing_kept_is_an_error(tmp_path, qwen_tokenizer):
    cfg = make_cfg(tmp_path, min_tokens=10_000, max_tokens=20_000)
    with pytest.raises(UserError, match="no trajectory kept out of 27 rows"):
        prepare_data(cfg, qwen_tokenizer)


def test_load_manifest_reports_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a"}\n')
    with pytest.raises(UserError, match=r"m\.jsonl:1: missing field"):
        load_manifest(path)
    path.write_text("not json\n")
    with pytest.raises(UserError, match=r"m\.jsonl:1: not valid JSON"):
        load_manifest(path)
    with pytest.raises(UserError, match="run prepare-data first"):
        load_manifest(tmp_path / "absent.jsonl")
