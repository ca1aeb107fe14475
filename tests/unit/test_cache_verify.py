"""verify_cache and `cache verify`: a good cache passes; corruption is named per part, sample and check."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cache_schema import CacheStore, inspect_cache, verify_cache
from hyperdistill.cli import cache
from cache_schema.synthetic import example_root_meta, synthetic_sample

K, VOCAB = 8, 1000


def build(path: str, n_shards: int = 2, per_shard: int = 6, complete: tuple[int, ...] | None = None) -> dict[int, list]:
    """Samples by shard; small chunks (64 rows) so that samples span several chunks."""
    rng = np.random.default_rng(0)
    store = CacheStore.create_or_open(path, example_root_meta(k=K, vocab_size=VOCAB, num_shards=n_shards))
    written = {}
    for shard in complete if complete is not None else range(n_shards):
        with store.open_part_writer(shard, "test", chunk_bytes=64 * 4 * K) as w:
            written[shard] = [synthetic_sample(rng, f"s{shard}-{i}", n_tokens=int(rng.integers(20, 300)), k=K,
                                               vocab_size=VOCAB) for i in range(per_shard)]
            for s in written[shard]:
                w.add(s)
    return written


def samples_touching_chunk(samples, chunk_rows: int, chunk: int) -> list[str]:
    starts = np.cumsum([0] + [len(s.positions) for s in samples])
    lo, hi = chunk * chunk_rows, (chunk + 1) * chunk_rows
    return [s.sample_id for s, a, b in zip(samples, starts[:-1], starts[1:]) if a < hi and b > lo and b > a]


def test_good_cache_verifies_clean(tmp_path):
    path = str(tmp_path / "c.zarr")
    written = build(path)
    report = verify_cache(path)
    assert report.ok, [str(p) for p in report.problems]
    assert report.parts_complete == report.parts_total == 2
    assert report.samples == 12
    assert report.rows == sum(len(s.positions) for v in written.values() for s in v)
    result = CliRunner().invoke(cache, ["verify", path])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


@pytest.mark.parametrize("array", ["topk_logprobs", "topk_ids"])
def test_flipped_bytes_in_a_chunk_name_the_affected_samples(tmp_path, array):
    path = str(tmp_path / "c.zarr")
    written = build(path)
    chunk_rows = zarr.open_array(f"{path}/parts/00001/{array}", mode="r").chunks[0]
    chunk = 1
    chunk_file = tmp_path / "c.zarr" / "parts" / "00001" / array / "c" / str(chunk) / "0"
    data = bytearray(chunk_file.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    affected = samples_touching_chunk(written[1], chunk_rows, chunk)
    assert affected

    report = verify_cache(path)
    bad = sorted({p.sample_id for p in report.problems})
    assert bad == sorted(affected)
    assert {p.check for p in report.problems} == {"read"}
    assert all(p.shard == 1 and array in p.detail and f"chunk {chunk}" in p.detail for p in report.problems)

    result = CliRunner().invoke(cache, ["verify", path])
    assert result.exit_code == 1
    for sid in affected:
        assert f"sample {sid!r}: read:" in result.output


def test_wrong_values_that_decompress_fine_are_caught(tmp_path):
    """Rewrite one sample's top-K ids through Zarr (valid chunks, wrong content): checksum and duplicate-id
    checks name exactly that sample."""
    path = str(tmp_path / "c.zarr")
    written = build(path)
    victim = written[0][2]
    start = sum(len(s.positions) for s in written[0][:2])
    assert len(victim.positions) > 0
    ids = zarr.open_array(f"{path}/parts/00000/topk_ids", mode="r+")
    row = ids[start]
    row[1] = row[0]
    ids[start] = row
    report = verify_cache(path)
    assert {(p.sample_id, p.check) for p in report.problems} == {(victim.sample_id, "checksum"),
                                                                   (victim.sample_id, "duplicate_ids")}
    dup = next(p for p in report.problems if p.check == "duplicate_ids")
    assert f"position {int(victim.positions[0])}" in dup.detail


def test_incomplete_missing_and_deleted_chunks_are_reported(tmp_path):
    path = str(tmp_path / "c.zarr")
    build(path, n_shards=3, complete=(0,))
    store = CacheStore.create_or_open(path, example_root_meta(k=K, vocab_size=VOCAB, num_shards=3))
    with pytest.raises(RuntimeError):
        with store.open_part_writer(1, "crashing"):
            raise RuntimeError("boom")
    (tmp_path / "c.zarr" / "parts" / "00000" / "input_ids" / "c" / "0").unlink()
    checks = {(p.shard, p.check) for p in verify_cache(path).problems}
    assert (1, "part_incomplete") in checks and (2, "part_missing") in checks
    assert (0, "chunks_missing") in checks and (0, "checksum") in checks


def test_manifest_samples_must_be_present(tmp_path):
    path = str(tmp_path / "c.zarr")
    written = build(path)
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"sample_id": s.sample_id, "shard": shard, "n_tokens": 1} for shard, v in written.items() for s in v]
    rows.append({"id": "never-scored", "shard": 1})
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = CliRunner().invoke(cache, ["verify", path, "--manifest", str(manifest)])
    assert result.exit_code == 1
    assert "part 00001 sample 'never-scored': manifest_missing" in result.output
    assert result.output.count("manifest_missing") == 1


def test_user_errors_exit_2_with_one_line(tmp_path):
    result = CliRunner().invoke(cache, ["verify", str(tmp_path / "nothing.zarr")])
    assert result.exit_code == 2
    assert result.output.startswith("error: cache ") and result.output.count("\n") == 1
    bad_manifest = tmp_path / "m.jsonl"
    bad_manifest.write_text('{"shard": 0}\n')
    path = str(tmp_path / "c.zarr")
    build(path, n_shards=1, per_shard=1)
    result = CliRunner().invoke(cache, ["verify", path, "--manifest", str(bad_manifest)])
    assert result.exit_code == 2 and "line 1" in result.output


def test_part_written_with_another_k_is_reported(tmp_path):
    path = str(tmp_path / "c.zarr")
    build(path)
    zarr.open_group(f"{path}/parts/00001", mode="r+").update_attributes({"k": K * 2})
    problems = verify_cache(path).problems
    assert [(p.shard, p.check) for p in problems] == [(1, "part")]
    assert f"k={K * 2}" in problems[0].detail


def test_verify_and_inspect_a_memory_url():
    path = f"memory://verify-{uuid.uuid4().hex}/c.zarr"
    written = build(path, n_shards=1, per_shard=3)
    report = verify_cache(path)
    assert report.ok and report.samples == 3
    info = inspect_cache(path)
    assert info["rows"] == sum(len(s.positions) for s in written[0]) and info["bytes_on_disk"] > 0
    assert info["bytes_by_array"]["topk_ids"] > 0
