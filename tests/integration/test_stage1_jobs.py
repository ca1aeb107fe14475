"""Stage 1 jobs end to end with the reference (HF) backend: a full run, a SIGKILL mid-shard and its
re-run, a double launch. The real vLLM engine's jobs are in test_capture_jobs.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest

from cache_schema import CacheReader, load_manifest_ids, verify_cache
from common.manifest import load_manifest, prepare_data
from common.models import load_tokenizer
from stage1_teacher.run import main as stage1_main
from tests.pipeline_helpers import KILLER, REPO, config_overrides, demo_config


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-student")


def _prepared(root, tokenizer, *overrides):
    cfg = demo_config(root, "teacher.backend=hf", *overrides)
    prepare_data(cfg, tokenizer)
    return cfg


@pytest.fixture(scope="module")
def full_run(hf_cache_run):
    """One uninterrupted stage-1 run over every shard: the reference for the other tests."""
    return hf_cache_run


def test_full_run_fills_every_part_and_verifies(full_run):
    cfg, summary = full_run
    manifest = load_manifest(cfg.manifest)
    assert sorted(summary.shards_done) == list(range(cfg.data.num_shards))
    assert summary.samples == len(manifest)
    report = verify_cache(cfg.cache.path, load_manifest_ids(cfg.manifest))
    assert report.ok, report.problems[:5]
    reader = CacheReader(cfg.cache.path)
    assert sorted(reader.sample_ids) == sorted(m["id"] for m in manifest)
    # assistant positions: a row for t exactly where token t+1 is an assistant token
    for i in range(len(reader)):
        s = reader[i]
        np.testing.assert_array_equal(s.positions, np.flatnonzero(s.loss_mask[1:]))
    assert sum(len(reader[i].positions) for i in range(len(reader))) == summary.rows


def test_rerun_skips_complete_parts(full_run):
    cfg, _ = full_run
    again = stage1_main(cfg)
    assert again.shards_done == [] and sorted(again.shards_skipped) == list(range(cfg.data.num_shards))


def test_bad_shard_arguments_are_refused(full_run):
    from common.errors import UserError

    cfg, _ = full_run
    with pytest.raises(UserError, match="--shard"):
        stage1_main(cfg, shards=[cfg.data.num_shards])
    with pytest.raises(UserError, match="--num-shards"):
        stage1_main(cfg, shards=[0], num_shards=cfg.data.num_shards + 1)




def _biggest_shard(cfg) -> int:
    counts = np.bincount([m["shard"] for m in load_manifest(cfg.manifest)], minlength=cfg.data.num_shards)
    return int(counts.argmax())


@pytest.mark.parametrize("part_state", ["complete", "incomplete"])
def test_other_settings_are_refused_before_the_teacher_loads(full_run, tmp_path, part_state, monkeypatch):
    """`teacher-cache --set cache.k=64` on a K=128 cache: one line naming k, exit 2, and the teacher is
    never loaded, whether the requested part is complete (before: skipped, exit 0) or not (before: refused
    only after loading the teacher)."""
    import shutil

    import zarr
    from click.testing import CliRunner

    import stage1_teacher.run as run
    from hyperdistill.cli import main

    loads = []
    real = run.make_backend

    def counting_backend(*args, **kwargs):  # the real backend, counted: it is what loads the teacher
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "make_backend", counting_backend)
    cfg, _ = full_run
    path = tmp_path / "cache.zarr"
    shutil.copytree(cfg.cache.path, path)
    if part_state == "incomplete":
        part = zarr.open_group(str(path), path="parts/00001", mode="r+")
        part.attrs["complete"] = False
    sets = [*config_overrides(cfg), f"cache.path={path}", "teacher.backend=hf", "cache.k=64"]
    args = ["teacher-cache", "--config", str(REPO / "configs" / "demo.yaml"), "--shard", "1"]
    for item in sets:
        args += ["--set", item]
    refused = CliRunner().invoke(main, args)
    assert (refused.exit_code, loads) == (2, []), refused.output
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert errors == [f"error: cache {path}: k is 128 in the cache but 64 in this run; "
                      "use a new cache path or the cache's settings"], refused.stderr
    # The same run with the cache's own K goes ahead (skips the complete part, redoes an incomplete one).
    ok = CliRunner().invoke(main, args[:-2])
    assert ok.exit_code == 0, ok.output
    assert len(loads) == (part_state == "incomplete")


def test_sigkill_mid_shard_then_rerun_matches_uninterrupted(full_run, tmp_path, tokenizer):
    ref_cfg, _ = full_run
    # Small engine batches so that the shard takes several score() calls.
    cfg = _prepared(tmp_path, tokenizer, "teacher.batch_tokens=1500")
    shard = _biggest_shard(cfg)
    args = [*config_overrides(cfg), "teacher.backend=hf", "teacher.batch_tokens=1500"]
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(REPO / "configs" / "demo.yaml"), str(shard), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    reader_status = CacheReader(cfg.cache.path).part_status[shard]
    assert reader_status == "incomplete"

    summary = stage1_main(cfg, shards=[shard])  # the dead writer's lease is stale: taken over
    assert summary.shards_done == [shard]
    assert verify_cache(cfg.cache.path, shards=[shard]).ok

    ours, ref = CacheReader(cfg.cache.path), CacheReader(ref_cfg.cache.path)
    assert len(ours) == sum(1 for m in load_manifest(cfg.manifest) if m["shard"] == shard)
    for i in range(len(ours)):
        a, b = ours[i], ref[ref.index_of(ours[i].sample_id)]
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from cache_schema import PartLease
    from cache_schema.format import part_path
    from cache_schema.storage import CacheLocation
    lease = PartLease(CacheLocation(sys.argv[1]), part_path(int(sys.argv[2])), owner="another-job")
    lease.acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_double_launch_leaves_a_leased_part_alone(full_run, tmp_path):
    import shutil

    import zarr

    from cache_schema.format import part_path

    ref_cfg, _ = full_run
    shard = _biggest_shard(ref_cfg)
    other = (shard + 1) % ref_cfg.data.num_shards
    # A copy of the complete cache whose `shard` part is to be redone (as after a killed job).
    cfg = replace(ref_cfg, cache=replace(ref_cfg.cache, path=str(tmp_path / "cache.zarr")))
    shutil.copytree(ref_cfg.cache.path, cfg.cache.path)
    zarr.open_group(cfg.cache.path, path=part_path(shard), mode="r+").attrs["complete"] = False
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, cfg.cache.path, str(shard)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        summary = stage1_main(cfg, shards=[shard])
        assert summary.shards_busy == [shard] and summary.shards_done == []
        assert CacheReader(cfg.cache.path).part_status[shard] != "complete"
        assert verify_cache(cfg.cache.path, shards=[other]).ok
    finally:
        holder.kill()
        holder.wait()
