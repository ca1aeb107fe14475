"""A part is reported complete only when every array of it is on the store, and `cache verify` passes every part
that is: a part with no samples (a shard the data left empty) or with samples that store no rows, a write that
fails at any point of a part, and a writer SIGKILLed at any of its last writes (the part never reads complete;
the next writer rewrites it to the same content). And a stage-1 option this vLLM cannot run on CPU
(batch-invariant mode) is refused before the job touches the cache.

The faults go through `FaultyStore`, a real zarr LocalStore wrapped (zarr's WrapperStore) so that its n-th write
fails or kills the process before it reaches the disk; everything else is the real writer, reader and verify."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

from cache_schema import CacheReader, CacheStore, SampleRows, verify_cache
from cache_schema.format import LEASE_FILE, part_path, stored_positions
from cache_schema.metadata import SamplingMeta
from cache_schema.storage import CacheLocation
from cache_schema.synthetic import example_root_meta, synthetic_sample
from tests.pipeline_helpers import REPO

VOCAB, K, DRAWS = 1000, 8, 4
CHUNK_BYTES = 256  # small chunks: a few samples span several of them, so every kind of chunk gets written


class FaultyStore(WrapperStore):
    """A store whose `fail_at`-th write (1-based, in the order they are issued) raises OSError, or with
    kill=True SIGKILLs the process, before it is written. Counts writes either way."""

    def __init__(self, store, fail_at: int | None = None, kill: bool = False):
        super().__init__(store)
        self.fail_at, self.kill, self.writes = fail_at, kill, 0

    def _with_store(self, store):
        return type(self)(store, self.fail_at, self.kill)

    async def set(self, key, value):
        self.writes += 1
        if self.writes == self.fail_at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(f"injected: write {self.writes} ({key}) failed")
        await self._store.set(key, value)


def root_meta(kind: str):
    if kind == "sampled":
        return example_root_meta(k=K, vocab_size=VOCAB, num_shards=2, sampled=SamplingMeta(draws=DRAWS, seed=0))
    return example_root_meta(k=K, vocab_size=VOCAB, num_shards=2, encoding=kind)


def samples(kind: str, zero_row: int = 0) -> list[SampleRows]:
    """Three samples with rows, after `zero_row` samples whose loss mask stores no rows at all."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(zero_row + 3):
        s = synthetic_sample(rng, f"s{i}", n_tokens=120, k=K, vocab_size=VOCAB)
        if i < zero_row:
            mask = np.zeros(120, dtype=bool)
            s = replace(s, loss_mask=mask, positions=stored_positions(mask, "assistant"),
                        topk_ids=s.topk_ids[:0], topk_logprobs=s.topk_logprobs[:0])
        if kind == "sampled":
            draws = np.take_along_axis(s.topk_ids, rng.integers(0, K, (len(s.positions), DRAWS)), axis=1)
            s = replace(s, topk_ids=None, topk_logprobs=None, draws=draws.astype(np.int64))
        out.append(s)
    return out


def write_part(store: CacheStore, shard: int, rows: list[SampleRows], owner: str = "test") -> None:
    with store.open_part_writer(shard, owner, chunk_bytes=CHUNK_BYTES) as w:
        for s in rows:
            w.add(s)


def faulty(path: str, kind: str, fail_at: int | None = None, kill: bool = False) -> CacheStore:
    """The cache at `path` opened for writing through a FaultyStore."""
    base = CacheStore.create_or_open(path, root_meta(kind))
    root = zarr.open_group(FaultyStore(LocalStore(path), fail_at, kill), mode="r+")
    return CacheStore(CacheLocation(path), root, base.meta, base.run_meta)


def content(path: str) -> dict[str, dict[str, np.ndarray]]:
    reader = CacheReader(path)
    return {s.sample_id: {"ids": s.topk_ids, "lp": s.topk_logprobs, "input_ids": s.input_ids, "pos": s.positions}
            for s in (reader[i] for i in range(len(reader)))}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for sid in a:
        for name in a[sid]:
            np.testing.assert_array_equal(a[sid][name], b[sid][name], err_msg=f"{sid} {name}")


@pytest.mark.parametrize("kind", ["fp16", "qlog8", "sampled"])
def test_empty_parts_and_zero_row_samples_verify(tmp_path, kind):
    """Offsets chunks that hold only zeros (the fill value) are written too: an empty part is [0] in every
    offsets array, and samples without rows at the start of a part make an all-zero row_offsets chunk."""
    path = str(tmp_path / "c.zarr")
    store = CacheStore.create_or_open(path, root_meta(kind))
    write_part(store, 0, [])
    write_part(store, 1, samples(kind, zero_row=40))
    assert store.part_status(0) == store.part_status(1) == "complete"
    report = verify_cache(path)
    assert report.ok, report.problems
    assert report.parts_complete == 2 and report.samples == 43
    assert [len(CacheReader(path)[i].positions) for i in range(40)] == [0] * 40


def test_a_failed_write_anywhere_leaves_the_part_incomplete_and_a_rerun_repairs_it(tmp_path):
    """A write of the part fails (array metadata, chunks from the background writer, the small arrays and
    attributes of finish(), the marker): the error reaches the caller and the part is not complete."""
    kind = "qlog8"  # the id-table encoding: one more array written in finish()
    rows = samples(kind, zero_row=2)
    reference = str(tmp_path / "reference.zarr")
    counting = faulty(reference, kind)
    write_part(counting, 0, rows)
    n_writes = counting.root.store.writes
    assert n_writes > 20  # every array's metadata and chunks, the part's attributes, the marker
    expected = content(reference)
    path = str(tmp_path / "c.zarr")
    # Every 4th write while the part is filled, then each of the last 25 (finish(): the last chunks, the small
    # arrays, the part's attributes, the marker).
    for fail_at in sorted({*range(1, n_writes - 25, 4), *range(max(1, n_writes - 25), n_writes + 1)}):
        store = faulty(path, kind, fail_at)
        with pytest.raises(OSError, match=f"injected: write {fail_at} "):
            write_part(store, 0, rows)
        assert store.part_status(0) != "complete", f"complete after write {fail_at} of {n_writes} failed"
        assert not store.location.exists(f"{part_path(0)}/{LEASE_FILE}")  # released on the way out
    write_part(CacheStore.create_or_open(path, root_meta(kind)), 0, rows)
    assert verify_cache(path, shards=[0]).ok
    assert_same(content(path), expected)


KILLED_WRITER = textwrap.dedent(
    """
    import socket, os, sys
    from tests.integration.test_part_commit import faulty, samples, write_part
    path, kind, fail_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    write_part(faulty(path, kind, fail_at, kill=True), 0, samples(kind, zero_row=2),
               owner=f"{socket.gethostname()}:{os.getpid()}")
    """
)


def test_a_writer_killed_at_its_last_writes_never_leaves_a_complete_part(tmp_path):
    """SIGKILL just before the completion marker, before the part's final attributes, and mid-part: the part
    reads incomplete (stage 1 rewrites it), the dead writer's lease is taken over, and the rewrite verifies and
    equals an uninterrupted write."""
    kind = "fp16"
    rows = samples(kind, zero_row=2)
    reference = str(tmp_path / "reference.zarr")
    counting = faulty(reference, kind)
    write_part(counting, 0, rows)
    n_writes = counting.root.store.writes
    expected = content(reference)
    for fail_at in (n_writes, n_writes - 1, n_writes // 2):
        path = str(tmp_path / f"killed-at-{fail_at}.zarr")
        child = subprocess.run([sys.executable, "-c", KILLED_WRITER, path, kind, str(fail_at)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                               timeout=120)
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
        store = CacheStore.create_or_open(path, root_meta(kind))
        assert store.part_status(0) == "incomplete", f"killed at write {fail_at} of {n_writes}"
        assert store.location.exists(f"{part_path(0)}/{LEASE_FILE}")  # the dead writer's, left behind
        write_part(store, 0, rows, owner="rerun")
        assert store.part_status(0) == "complete"
        assert verify_cache(path, shards=[0]).ok
        assert_same(content(path), expected)


def test_batch_invariant_mode_on_cpu_exits_2_with_one_line_naming_the_way_out(tmp_path):
    """Refused before the manifest is read or an engine starts: vLLM 0.32's batch-invariant kernels are GPU/XPU
    ones (its CPU MoE backend refuses the mode after start-up)."""
    cli = [sys.executable, "-m", "hyperdistill.cli", "teacher-cache", "--config", str(REPO / "configs" / "demo.yaml"),
           "--set", "teacher.batch_invariant=true", "--set", f"cache.path={tmp_path / 'c.zarr'}",
           "--set", f"manifest={tmp_path / 'manifest.jsonl'}"]
    run = subprocess.run(cli, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [run.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("error: teacher.batch_invariant: ") and "no CPU kernels" in errors[0]
    assert "set teacher.batch_invariant: false" in errors[0]
    assert not (tmp_path / "c.zarr").exists()


def test_a_stage1_shard_the_data_leaves_empty_gets_a_complete_part_that_verifies(tmp_path):
    """The demo cut to 512 tokens leaves shard 1 without samples: its job writes a complete, empty part (no
    engine step) that verifies like the others (it failed chunks_missing on every offsets array before)."""
    from common.manifest import load_manifest, prepare_data
    from common.models import load_tokenizer
    from stage1_teacher.run import main as stage1_main
    from tests.pipeline_helpers import demo_config

    cfg = demo_config(tmp_path, "teacher.backend=hf", "data.max_tokens=512")
    prepare_data(cfg, load_tokenizer(cfg.student.model))
    assert [e["shard"] for e in load_manifest(cfg.manifest)].count(1) == 0
    summary = stage1_main(cfg, shards=[1])
    assert summary.shards_done == [1] and summary.samples == 0
    report = verify_cache(cfg.cache.path, shards=[1])
    assert report.ok and report.parts_complete == 1, report.problems
