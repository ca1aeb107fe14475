"""inspect / show / stats report the right numbers (computed here independently from what was written)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cache_schema import CacheStore, SampleRows, cache_stats, inspect_cache, show_sample, stored_positions
from hyperdistill.cli import cache
from cache_schema.synthetic import example_root_meta, synthetic_sample
from common.errors import UserError

K = 8
QWEN_VOCAB = 151936


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """Shards 0 and 1 complete, shard 2 incomplete."""
    path = str(tmp_path_factory.mktemp("inspect") / "c.zarr")
    rng = np.random.default_rng(3)
    store = CacheStore.create_or_open(path, example_root_meta(k=K, vocab_size=1000, num_shards=3))
    written = []
    for shard in (0, 1):
        with store.open_part_writer(shard, "test") as w:
            for i in range(4):
                s = synthetic_sample(rng, f"s{shard}-{i}", n_tokens=int(rng.integers(50, 400)), k=K, vocab_size=1000)
                w.add(s)
                written.append(s)
    with pytest.raises(RuntimeError):
        with store.open_part_writer(2, "test"):
            raise RuntimeError("crash")
    return path, written


def test_inspect_counts_and_sizes(small_cache):
    path, written = small_cache
    info = inspect_cache(path)
    rows = sum(len(s.positions) for s in written)
    assert info["samples"] == len(written)
    assert info["tokens"] == sum(len(s.input_ids) for s in written)
    assert info["rows"] == rows
    assert (info["parts_complete"], info["parts_total"], info["parts_incomplete"]) == (2, 3, [2])
    assert info["k"] == K and info["encoding"] == "fp16" and info["teacher"]["model"] == "synthetic-teacher"
    def du(folder: str) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)

    assert info["bytes_on_disk"] == du(path)  # everything, the incomplete part included
    complete_parts = du(f"{path}/parts/00000") + du(f"{path}/parts/00001")
    assert info["bytes_per_row"] == pytest.approx(complete_parts / rows)
    topk = sum(du(f"{path}/parts/0000{s}/{a}") for s in (0, 1) for a in ("topk_ids", "topk_logprobs"))
    assert info["topk_bytes_per_row"] == pytest.approx(topk / rows)
    # decoded size of the top-K arrays alone: uint32 ids + fp16 log-probs
    assert info["decoded_bytes"] >= rows * K * (4 + 2)
    assert info["compression_ratio"] == pytest.approx(info["decoded_bytes"] / sum(info["bytes_by_array"].values()))

    result = CliRunner().invoke(cache, ["inspect", path, "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["rows"] == rows
    text = CliRunner().invoke(cache, ["inspect", path]).output
    assert f"rows: {rows}" in text and f"samples: {len(written)}" in text and "parts_incomplete: 00002" in text


def test_show_decodes_tokens_and_probabilities(tmp_path, qwen_tokenizer):
    path = str(tmp_path / "c.zarr")
    text_ids = qwen_tokenizer.encode("def hello_world():\n    return 42\n")
    n = len(text_ids)
    mask = np.zeros(n, dtype=bool)
    mask[3:] = True
    pos = stored_positions(mask, "assistant")
    rng = np.random.default_rng(0)
    topk = np.stack([rng.choice(50_000, size=K, replace=False) for _ in pos])
    topk[:, 0] = [text_ids[t + 1] for t in pos]  # the teacher's favourite is the actual next token
    probs = np.array([0.6, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001])
    lp = np.tile(np.log(probs), (len(pos), 1)).astype(np.float32)
    store = CacheStore.create_or_open(path, example_root_meta(k=K, vocab_size=QWEN_VOCAB, num_shards=1))
    with store.open_part_writer(0, "test") as w:
        w.add(SampleRows(sample_id="hello", input_ids=np.array(text_ids), loss_mask=mask,
                         prompt_ids=np.array(text_ids[:2]), positions=pos, topk_ids=topk, topk_logprobs=lp))
    table = show_sample(path, "hello", pos=(int(pos[0]), int(pos[0]) + 2), tokenizer=qwen_tokenizer)
    lines = table.splitlines()
    assert f"{n} tokens" in lines[0] and f"{len(pos)} rows" in lines[0]
    row = next(line for line in lines if line.split()[0] == str(pos[0]))
    next_text = repr(qwen_tokenizer.decode([text_ids[pos[0] + 1]]))
    assert next_text in row
    stored_p = np.exp(np.log(probs).astype(np.float16).astype(np.float32))  # what the cache holds
    assert f" {stored_p[0]:.4f} " in row  # p(next)
    assert f" {1 - stored_p.sum():.4f} " in row  # tail mass
    assert f"{next_text} 0.600" in row and f"{repr(qwen_tokenizer.decode([int(topk[0, 1])]))} 0.200" in row
    assert "2 of" in lines[-1]

    by_index = CliRunner().invoke(cache, ["show", path, "0", "--raw-ids", "--pos", f"{pos[1]}:{pos[1] + 1}"])
    assert by_index.exit_code == 0, by_index.output
    assert f"{topk[1, 0]} 0.600" in by_index.output and "1 of" in by_index.output
    missing = CliRunner().invoke(cache, ["show", path, "nope", "--raw-ids"])
    assert missing.exit_code == 2 and "no sample with id 'nope'" in missing.output
    no_tokenizer = CliRunner().invoke(cache, ["show", path, "hello"])  # the metadata names no tokenizer path
    assert no_tokenizer.exit_code == 2 and "--tokenizer" in no_tokenizer.output


def test_stats_match_an_independent_computation(small_cache, tmp_path):
    path, written = small_cache
    lp = np.concatenate([s.topk_logprobs for s in written]).astype(np.float16).astype(np.float64)
    p = np.exp(lp)
    tail = np.clip(1 - p.sum(axis=1), 0, 1)
    entropy = -(p * lp).sum(axis=1) - np.where(tail > 0, tail * np.log(np.where(tail > 0, tail, 1)), 0)
    plot = tmp_path / "stats.png"
    stats = cache_stats(path, str(plot))
    assert stats["rows"] == stats["rows_used"] == len(lp)
    assert stats["entropy"]["mean"] == pytest.approx(entropy.mean(), rel=1e-4)
    assert stats["entropy"]["p50"] == pytest.approx(np.median(entropy), rel=1e-4)
    assert stats["top1_mass"]["mean"] == pytest.approx(p[:, 0].mean(), rel=1e-4)
    assert stats["tail_mass"]["p95"] == pytest.approx(np.percentile(tail, 95), rel=1e-3, abs=1e-6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sampled = cache_stats(path, max_rows=10)  # whole chunks spread over the cache
    assert 0 < sampled["rows_used"] < len(lp)

    out = CliRunner().invoke(cache, ["stats", path, "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["top1_mass"]["mean"] == pytest.approx(p[:, 0].mean(), rel=1e-4)


def test_show_out_of_range_index_is_a_user_error(small_cache):
    path, written = small_cache
    with pytest.raises(UserError, match="no sample with id or index"):
        show_sample(path, len(written), raw_ids=True)
