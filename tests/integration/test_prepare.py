"""prepare-data as the hand-off to stage 1: parallel rendering equals serial, the rendered parts are what stage 1
reads (without the source), another run's rendered samples are refused, stage 2 takes the held-out split from
the manifest."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from cache_schema.format import stored_positions
from cache_schema.manifest import dataset_fingerprint, load_manifest, rendered_path
from cache_schema.rendered import read_rendered_meta, read_rendered_part
from common.config import RunConfig
from common.errors import UserError
from common.manifest import load_shard_samples, prepare_data
from common.sharding import shard_of
from common.trajectories import SAMPLE_DIR
from stage2_student.data import manifest_split


def make_cfg(root: Path, source: str, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.manifest = str(root / "manifest.jsonl")
    cfg.data.source = source
    cfg.data.resolved_only = False
    cfg.data.num_shards = 3
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


@pytest.fixture(scope="module")
def serial_and_parallel(tmp_path_factory, qwen_tokenizer):
    """The bundled sample copied aside, prepared once serially and once with 2 workers."""
    root = tmp_path_factory.mktemp("prepare")
    source = root / "source"
    shutil.copytree(SAMPLE_DIR, source)
    runs = {}
    for workers in (1, 2):
        cfg = make_cfg(root / f"w{workers}", str(source))
        runs[workers] = (cfg, prepare_data(cfg, qwen_tokenizer, workers=workers))
    return source, runs


def test_two_workers_give_exactly_the_serial_result(serial_and_parallel):
    _, runs = serial_and_parallel
    (cfg1, s1), (cfg2, s2) = runs[1], runs[2]
    assert s2.workers == 2 and s1.workers == 1
    assert Path(cfg1.manifest).read_bytes() == Path(cfg2.manifest).read_bytes()  # order included
    assert s1.fingerprint == s2.fingerprint
    same = ("kept", "dropped", "drop_examples", "n_tokens", "n_assistant_tokens", "per_shard", "heldout")
    assert {k: getattr(s1, k) for k in same} == {k: getattr(s2, k) for k in same}
    for shard in range(cfg1.data.num_shards):
        a = read_rendered_part(rendered_path(cfg1.manifest), shard)
        b = read_rendered_part(rendered_path(cfg2.manifest), shard)
        assert [x.sample_id for x in a] == [x.sample_id for x in b]
        for x, y in zip(a, b):
            for name in ("input_ids", "loss_mask", "prompt_ids", "positions"):
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name))


def test_each_part_holds_its_shards_samples_as_the_manifest_lists_them(serial_and_parallel, qwen_tokenizer):
    _, runs = serial_and_parallel
    cfg, summary = runs[2]
    rows = load_manifest(cfg.manifest)
    meta = read_rendered_meta(rendered_path(cfg.manifest))
    assert meta.dataset_fingerprint == dataset_fingerprint(cfg.manifest) == summary.fingerprint
    assert meta.positions == "assistant" and meta.num_shards == 3
    for shard in range(3):
        samples = load_shard_samples(cfg, qwen_tokenizer, shard)
        listed = [r for r in rows if r["shard"] == shard]
        assert [s.sample_id for s in samples] == [r["id"] for r in listed]
        for s, r in zip(samples, listed):
            assert shard_of(s.sample_id, 3) == shard
            assert len(s.input_ids) == r["n_tokens"] and int(s.loss_mask.sum()) == r["n_assistant_tokens"]
            assert len(s.prompt_ids) == r["n_prompt_tokens"]
            assert s.input_ids.dtype == np.uint32 and s.loss_mask.dtype == bool
            np.testing.assert_array_equal(s.positions, stored_positions(s.loss_mask, "assistant"))


def test_stage1_reads_its_part_without_the_source(serial_and_parallel, qwen_tokenizer, tmp_path):
    source, runs = serial_and_parallel
    cfg, _ = runs[1]
    before = {shard: load_shard_samples(cfg, qwen_tokenizer, shard) for shard in range(3)}
    moved = tmp_path / "gone"
    shutil.move(source, moved)  # no source any more: a part is read from the rendered samples alone
    try:
        for shard in range(3):
            after = load_shard_samples(cfg, qwen_tokenizer, shard)
            assert [s.sample_id for s in after] == [s.sample_id for s in before[shard]]
            assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(after, before[shard]))
        other_mode = copy.deepcopy(cfg)
        other_mode.cache.positions = "all"  # positions follow the run's mode, derived from the stored mask
        for s in load_shard_samples(other_mode, qwen_tokenizer, 0):
            np.testing.assert_array_equal(s.positions, np.arange(len(s.input_ids) - 1))
    finally:
        shutil.move(moved, source)


def test_another_runs_rendered_samples_are_refused(serial_and_parallel, qwen_tokenizer):
    _, runs = serial_and_parallel
    cfg, _ = runs[1]
    other_data = copy.deepcopy(cfg)
    other_data.data.max_tokens = 4096
    with pytest.raises(UserError, match=r"prepared with data.max_tokens=8192 but this run has 4096; re-run prepare"):
        load_shard_samples(other_data, qwen_tokenizer, 0)
    templated = copy.deepcopy(qwen_tokenizer)
    templated.chat_template = qwen_tokenizer.chat_template.replace("helpful coding agent", "coding agent")
    with pytest.raises(UserError, match="chat template fingerprint .* re-run prepare-data"):
        load_shard_samples(cfg, templated, 0)
    with pytest.raises(UserError, match="shard 3: out of range"):
        load_shard_samples(cfg, qwen_tokenizer, 3)


def test_edited_manifest_is_refused(tmp_path, qwen_tokenizer):
    cfg = make_cfg(tmp_path, "sample", num_shards=2)
    prepare_data(cfg, qwen_tokenizer)
    with open(cfg.manifest, "a") as f:
        f.write("\n")
    with pytest.raises(UserError, match="dataset fingerprint"):
        load_shard_samples(cfg, qwen_tokenizer, 0)
    shutil.rmtree(rendered_path(cfg.manifest))
    with pytest.raises(UserError, match="rendered samples .*not found"):
        load_shard_samples(cfg, qwen_tokenizer, 0)


def test_teacher_cache_refuses_another_runs_samples_with_one_line(serial_and_parallel):
    from hyperdistill.cli import main

    _, runs = serial_and_parallel
    cfg, _ = runs[1]
    args = ["teacher-cache", "--set", f"manifest={cfg.manifest}", "--set", f"data.source={cfg.data.source}",
            "--set", "data.resolved_only=false", "--set", "data.num_shards=3", "--set", "data.max_tokens=4096",
            "--set", "teacher.backend=hf", "--set", f"cache.path={Path(cfg.manifest).parent / 'cache.zarr'}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: rendered samples ")
    assert "prepared with data." in result.output and "re-run prepare-data" in result.output
    assert not (Path(cfg.manifest).parent / "cache.zarr").exists()  # refused before any engine or cache


def test_stage2_split_comes_from_the_manifest(serial_and_parallel, tmp_path):
    _, runs = serial_and_parallel
    cfg, summary = runs[1]
    rows = load_manifest(cfg.manifest)
    ids = [r["id"] for r in reversed(rows)]  # any cache order
    reader = SimpleNamespace(path="c.zarr", sample_ids=ids,
                             meta=SimpleNamespace(dataset=SimpleNamespace(fingerprint=summary.fingerprint)))
    train, held = manifest_split(reader, cfg.manifest)
    flags = {r["id"]: r["heldout"] for r in rows}
    assert [ids[i] for i in held] == [i for i in ids if flags[i]] and len(held) == summary.heldout > 0
    assert sorted(train + held) == list(range(len(ids)))
    # Not the manifest the cache was built from (here: flags edited), or a sample it does not list: refused.
    edited = tmp_path / "manifest.jsonl"
    edited.write_text(Path(cfg.manifest).read_text().replace('"heldout": false', '"heldout": true', 1))
    with pytest.raises(UserError, match="is not the manifest cache c.zarr was built from"):
        manifest_split(reader, str(edited))
    stray = SimpleNamespace(path=reader.path, sample_ids=[*ids, "x"], meta=reader.meta)
    with pytest.raises(UserError, match="sample 'x' is not in manifest"):
        manifest_split(stray, cfg.manifest)
