"""prepare-data, the hand-off to stage 1: stream the source, filter, render in parallel, and write

- the manifest (JSONL, one line per kept sample in input order: ids, lengths, shard = cache part, held-out
  flag; format and reader in `cache_schema.manifest`), whose sha256 is the dataset fingerprint;
- the rendered samples (`cache_schema.rendered`: per shard, the token arrays stage 1 needs), so a stage-1
  job reads only its own part (`load_shard_samples`) and never parses or renders the source again;
- a summary JSON beside the manifest.

Memory is bounded by the part being written, not by the dataset: rows are streamed, at most a few render
batches per worker are in flight, manifest lines go straight to disk, samples are spilled per shard and each
part is assembled from its spill alone.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cache_schema.format import stored_positions
from cache_schema.manifest import (  # noqa: F401  (load_manifest, summary_path: the manifest's API, here too)
    MANIFEST_FIELDS, dataset_fingerprint, load_manifest, rendered_path, summary_path,
)
from cache_schema.rendered import RenderedMeta, RenderedWriter, TokenSample, read_rendered_meta, read_rendered_part
from common.config import DataConfig, RunConfig
from common.errors import UserError
from common.rendering import RenderedSample, SampleRejected, render_trajectory
from common.sharding import is_heldout, shard_of
from common.tokenizer import chat_template_fingerprint, tokenizer_fingerprint
from common.trajectories import DropReport, Trajectory, iter_trajectories

# Trajectories per task sent to a render worker, and tasks in flight per worker: enough to keep every
# worker busy, few enough that memory does not depend on the dataset.
RENDER_BATCH = 4
IN_FLIGHT_PER_WORKER = 2


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class NothingKept(UserError):
    """No trajectory survived the filters. `drops` lists, as a run that keeps something does, each drop
    reason with its first examples (the CLI prints it before the one-line error)."""

    def __init__(self, message: str, drops: list[str]):
        super().__init__(message)
        self.drops = drops


def format_drops(counts: dict[str, int], examples: dict[str, list[tuple[str, str]]]) -> list[str]:
    """'dropped N x reason' and its first example rows (location: detail), for every reason."""
    lines = []
    for reason, count in sorted(counts.items()):
        lines.append(f"dropped {count} x {reason}")
        lines += [f"    {loc}: {detail}" if detail else f"    {loc}" for loc, detail in examples.get(reason, [])]
    return lines


@dataclass
class PrepareSummary:
    source: str
    rows_read: int
    kept: int
    dropped: dict[str, int]
    drop_examples: dict[str, list[tuple[str, str]]]
    n_tokens: int
    n_assistant_tokens: int
    tokens_min: int
    tokens_mean: float
    tokens_max: int
    per_shard: list[int]
    heldout: int
    truncated: int
    fingerprint: str
    manifest_path: str
    summary_path: str
    kept_unknown_resolution: int = 0
    resolved_only: bool | str = "auto"
    rendered_path: str = ""
    workers: int = 1
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # tokenizer / template fingerprints, the data config

    def format(self) -> str:
        """Human-readable report: what was kept, and every drop reason with a few example rows."""
        n_dropped = sum(self.dropped.values())
        frac = self.n_assistant_tokens / self.n_tokens if self.n_tokens else 0.0
        lines = [
            f"source {self.source}: {self.rows_read} rows read, {self.kept} kept, {n_dropped} dropped",
            f"tokens: {self.n_tokens} total, {self.n_assistant_tokens} assistant ({frac:.1%}); "
            f"per sample min {self.tokens_min} / mean {self.tokens_mean:.0f} / max {self.tokens_max}",
            f"shards: {self.per_shard}; held out: {self.heldout}; truncated: {self.truncated}",
        ]
        if self.kept_unknown_resolution:
            lines.append(f"kept {self.kept_unknown_resolution} with no resolution field (the source does not say "
                         f"whether their task was resolved; data.resolved_only={self.resolved_only})")
        lines += format_drops(self.dropped, self.drop_examples)
        rate = self.kept / self.seconds if self.seconds else 0.0
        lines += [f"manifest: {self.manifest_path} ({self.fingerprint})", f"rendered samples: {self.rendered_path}",
                  f"summary: {self.summary_path}",
                  f"rendered {self.kept} in {self.seconds:.1f}s with {self.workers} worker(s) ({rate:.1f} trajectories/s, "
                  f"{self.n_tokens / self.seconds if self.seconds else 0.0:,.0f} tokens/s)"]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Rendering, serial or on worker processes, in input order

_WORKER: dict = {}


def _init_worker(tokenizer, data_cfg: DataConfig) -> None:
    _WORKER["tokenizer"], _WORKER["data"] = tokenizer, data_cfg


def _render_one(traj: Trajectory, tokenizer, data_cfg: DataConfig) -> RenderedSample | tuple[str, str]:
    """The rendered sample, or (drop reason, detail). SampleRejected does not cross processes as an
    exception (its constructor takes three arguments), so it travels as a tuple."""
    try:
        return render_trajectory(traj, tokenizer, data_cfg)
    except SampleRejected as e:
        return e.reason, str(e)


def _render_batch(batch: list[Trajectory]) -> list[RenderedSample | tuple[str, str]]:
    return [_render_one(t, _WORKER["tokenizer"], _WORKER["data"]) for t in batch]


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def render_stream(trajectories: Iterable[Trajectory], tokenizer, data_cfg: DataConfig,
                  workers: int = 1) -> Iterator[tuple[Trajectory, RenderedSample | tuple[str, str]]]:
    """(trajectory, its rendered sample or (drop reason, detail)) in input order. With workers > 1 the chat
    template runs on that many spawned processes (each with a copy of the tokenizer); results are taken in
    submission order, so the output is the serial one, and only a few batches per worker are in flight."""
    if workers <= 1:
        for traj in trajectories:
            yield traj, _render_one(traj, tokenizer, data_cfg)
        return
    # spawn: the parent holds tokenizer and zarr threads that a forked child must not inherit mid-use.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(tokenizer, data_cfg)) as pool:  # fmt: skip
        pending: deque = deque()
        for batch in _batches(trajectories, RENDER_BATCH):
            pending.append((batch, pool.submit(_render_batch, batch)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                done, future = pending.popleft()
                yield from zip(done, future.result())
        while pending:
            done, future = pending.popleft()
            yield from zip(done, future.result())


# ---------------------------------------------------------------------------------------------
# prepare-data


def prepare_data(cfg: RunConfig, tokenizer, workers: int = 1) -> PrepareSummary:
    """Stream, filter and render every trajectory of cfg.data.source; write the manifest, the rendered samples
    (one part per shard) and the summary. `workers` render processes (the CLI's default: every core)."""
    t0 = time.perf_counter()
    data = cfg.data
    manifest = Path(cfg.manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    partial = manifest.with_name(manifest.name + ".tmp")
    writer = RenderedWriter(rendered_path(manifest), data.num_shards, cfg.cache.positions)
    report = DropReport()
    kept = n_tokens = n_assistant = heldout = truncated = 0
    tokens_min, tokens_max = None, 0
    per_shard = [0] * data.num_shards
    try:
        with partial.open("w", encoding="utf-8") as out:
            stream = render_stream(iter_trajectories(data, report), tokenizer, data, workers)
            for traj, sample in tqdm(stream, desc="rendering", unit="traj", dynamic_ncols=True, mininterval=1.0):
                if isinstance(sample, tuple):
                    report.add(sample[0], traj.location, sample[1])
                    continue
                shard = shard_of(sample.sample_id, data.num_shards)
                held = is_heldout(sample.sample_id, data.heldout_fraction)
                entry = {
                    "id": sample.sample_id,
                    "instance_id": sample.instance_id,
                    "location": traj.location,
                    "n_tokens": int(len(sample.input_ids)),
                    "n_assistant_tokens": int(sample.loss_mask.sum()),
                    "n_prompt_tokens": int(len(sample.prompt_ids)),
                    "shard": shard,
                    "heldout": held,
                    "truncated": sample.truncated,
                }
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                writer.add(shard, sample.sample_id, sample.input_ids, sample.loss_mask, sample.prompt_ids)
                kept += 1
                n_tokens += entry["n_tokens"]
                n_assistant += entry["n_assistant_tokens"]
                tokens_min = entry["n_tokens"] if tokens_min is None else min(tokens_min, entry["n_tokens"])
                tokens_max = max(tokens_max, entry["n_tokens"])
                per_shard[shard] += 1
                heldout += held
                truncated += sample.truncated
        if not kept:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.counts.items()))
            raise NothingKept(
                f"data.source {data.source}: no trajectory kept out of {report.rows_read} rows read ({reasons})",
                format_drops(report.counts, report.examples),
            )
        fingerprint = dataset_fingerprint(partial)
        writer.finish(RenderedMeta(
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            chat_template_fingerprint=chat_template_fingerprint(tokenizer),
            dataset_fingerprint=fingerprint, data_config=_data_config(data), positions=cfg.cache.positions,
            num_shards=data.num_shards,
        ))  # fmt: skip
        os.replace(partial, manifest)  # last: a manifest always has its rendered samples beside it
    except BaseException:
        writer.abort()
        partial.unlink(missing_ok=True)
        raise

    summary = PrepareSummary(
        source=data.source,
        rows_read=report.rows_read,
        kept=kept,
        dropped=dict(report.counts),
        drop_examples=report.examples,
        n_tokens=n_tokens,
        n_assistant_tokens=n_assistant,
        tokens_min=tokens_min or 0,
        tokens_mean=n_tokens / kept,
        tokens_max=tokens_max,
        per_shard=per_shard,
        heldout=heldout,
        truncated=truncated,
        fingerprint=fingerprint,
        manifest_path=str(manifest),
        summary_path=str(summary_path(manifest)),
        kept_unknown_resolution=report.kept_unknown_resolution,
        resolved_only=data.resolved_only,
        rendered_path=str(rendered_path(manifest)),
        workers=max(1, workers),
        seconds=time.perf_counter() - t0,
        extra={
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "chat_template_fingerprint": chat_template_fingerprint(tokenizer),
            "data_config": dataclasses.asdict(data),
        },
    )
    _write_atomic(Path(summary.summary_path), json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    return summary


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _data_config(data: DataConfig) -> dict:
    """The data config as it reads back from the store's JSON attributes."""
    return json.loads(json.dumps(dataclasses.asdict(data)))


# ---------------------------------------------------------------------------------------------
# Stage 1's side of the hand-off


_VOCAB_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_fingerprint(tokenizer) -> str:
    """tokenizer_fingerprint, computed once per tokenizer object and vocabulary size (it hashes the whole
    vocabulary: ~0.6 s for Qwen's, which every part load would otherwise pay)."""
    size = len(tokenizer)
    cached = _VOCAB_FINGERPRINTS.get(tokenizer)
    if cached is None or cached[0] != size:
        cached = (size, tokenizer_fingerprint(tokenizer))
        _VOCAB_FINGERPRINTS[tokenizer] = cached
    return cached[1]


def check_rendered(cfg: RunConfig, tokenizer) -> RenderedMeta:
    """The rendered samples beside cfg.manifest, after checking that they are this run's: same tokenizer,
    chat template, manifest and data config (UserError naming the first difference: re-run prepare-data)."""
    path = rendered_path(cfg.manifest)
    meta = read_rendered_meta(path)
    where = f"rendered samples {path}"
    ours = {
        "tokenizer fingerprint": _vocab_fingerprint(tokenizer),
        "chat template fingerprint": chat_template_fingerprint(tokenizer),
        "dataset fingerprint (the manifest's sha256)": dataset_fingerprint(cfg.manifest),
    }
    theirs = {
        "tokenizer fingerprint": meta.tokenizer_fingerprint,
        "chat template fingerprint": meta.chat_template_fingerprint,
        "dataset fingerprint (the manifest's sha256)": meta.dataset_fingerprint,
    }
    for what, value in ours.items():
        if theirs[what] != value:
            raise UserError(f"{where}: {what} is {theirs[what]} there but {value} in this run; re-run prepare-data")
    run_data = _data_config(cfg.data)
    for key in sorted(set(run_data) | set(meta.data_config)):
        if run_data.get(key) != meta.data_config.get(key):
            raise UserError(f"{where}: prepared with data.{key}={meta.data_config.get(key)!r} but this run has "
                            f"{run_data.get(key)!r}; re-run prepare-data")
    return meta


def load_shard_samples(cfg: RunConfig, tokenizer, shard: int) -> list[TokenSample]:
    """The kept samples of one shard, in input order, read from the rendered samples prepare-data wrote
    (after `check_rendered`); positions for cfg.cache.positions."""
    if not 0 <= shard < cfg.data.num_shards:
        raise UserError(f"shard {shard}: out of range for data.num_shards={cfg.data.num_shards}")
    meta = check_rendered(cfg, tokenizer)
    samples = read_rendered_part(rendered_path(cfg.manifest), shard)
    if meta.positions != cfg.cache.positions:  # stored for another mode: derive them from the mask
        samples = [dataclasses.replace(s, positions=stored_positions(s.loss_mask, cfg.cache.positions))
                   for s in samples]
    return samples
