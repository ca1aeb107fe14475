"""Stage 1: the teacher reads every trajectory, teacher-forced; its top-K log-probs go into the cache.

The work is cut into shards (a stable hash of the trajectory id). Each shard is an independent,
resumable job that fills exactly one cache part:
    hyperdistill teacher-cache --shard 17 --num-shards 512     # one job, any scheduler (Slurm array)
    hyperdistill teacher-cache                                  # every shard, num_engines local workers
With teacher.data_parallel_size D > 1 the local workers are vLLM's D data-parallel ranks (DP+EP for MoE
teachers with enable_expert_parallel): they take shards from one queue and step together until all are done.
A complete part is skipped; an incomplete one (a killed job) is rewritten from scratch; a part leased
by another live process is left to it (a double launch corrupts nothing). An existing cache made with other
settings (K, encoding, teacher, tokenizer, ...) is refused before the engine starts.

With cache.rows=sampled, each sample's uniforms come from (cache.sample_seed, its id) and the parts hold
N draws per row from the teacher's distribution instead of its top-K (stage1_teacher.sampling).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from cache_schema import CacheReader, CacheStore, PartBusy, RootMeta, SampleRows, check_teacher_rows
from common.config import RunConfig, config_hash, to_dict
from common.errors import UserError
from common.manifest import check_rendered, dataset_fingerprint, load_shard_samples
from common.models import load_tokenizer, resolve_model
from common.tokenizer import chat_template_fingerprint, tokenizer_fingerprint
from stage1_teacher.backend import make_backend
from stage1_teacher.sampling import sample_uniforms

log = logging.getLogger("hyperdistill.stage1")


@dataclass
class JobSummary:
    shards_done: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)  # already complete
    shards_busy: list[int] = field(default_factory=list)  # leased by another live process
    samples: int = 0
    tokens: int = 0
    rows: int = 0
    seconds: float = 0.0

    def merge(self, other: JobSummary) -> None:
        for name in ("shards_done", "shards_skipped", "shards_busy"):
            getattr(self, name).extend(getattr(other, name))
        self.samples += other.samples
        self.tokens += other.tokens
        self.rows += other.rows

    def format(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (
            f"stage 1: {len(self.shards_done)} shard(s) written, {len(self.shards_skipped)} already complete, "
            f"{len(self.shards_busy)} busy elsewhere; {self.samples} samples, {self.tokens:,} tokens, "
            f"{self.rows:,} rows in {self.seconds:.1f}s ({rate:,.0f} tokens/s)"
        )


def root_meta(cfg: RunConfig, tokenizer, engine_version: str) -> RootMeta:
    """The cache's identity: what was scored, by which teacher, rendered by which tokenizer/template."""
    return RootMeta(
        k=cfg.cache.k,
        encoding=cfg.cache.encoding,
        mass_epsilon=cfg.cache.mass_epsilon,
        positions=cfg.cache.positions,
        teacher={
            "model": cfg.teacher.model,
            "revision": cfg.teacher.revision,
            "dtype": cfg.teacher.dtype,
            "quantization": cfg.teacher.quantization,
            "backend": cfg.teacher.backend,
            "engine_version": engine_version,
        },
        tokenizer={
            "name": cfg.student.model,
            "path": resolve_model(cfg.student.model, cfg.student.revision),
            "fingerprint": tokenizer_fingerprint(tokenizer),
        },
        chat_template_fingerprint=chat_template_fingerprint(tokenizer),
        vocab_size=_vocab_rows(cfg),
        dataset={
            "source": cfg.data.source,
            "fingerprint": dataset_fingerprint(cfg.manifest),
            "filter": {
                "resolved_only": cfg.data.resolved_only,
                "min_tokens": cfg.data.min_tokens,
                "max_tokens": cfg.data.max_tokens,
                "overlong": cfg.data.overlong,
                "exclude_instances": len(cfg.data.exclude_instances),
            },
        },
        num_shards=cfg.data.num_shards,
        config=to_dict(cfg),
        sampled=_sampling_meta(cfg),
    )


def _sampling_meta(cfg: RunConfig) -> dict | None:
    """SamplingMeta of a sampled cache: the HF backend and vLLM's engine capture resolve every draw (support
    'full'); with vLLM's public prompt log-probs the draws beyond its top-K stay tail draws (support 'top-K')."""
    if cfg.cache.rows != "sampled":
        return None
    exact = cfg.teacher.backend == "hf" or cfg.teacher.capture == "engine"
    return {"draws": cfg.cache.draws, "seed": cfg.cache.sample_seed, "support_k": None if exact else cfg.cache.k}


def _vocab_rows(cfg: RunConfig) -> int:
    from transformers import AutoConfig

    path = resolve_model(cfg.teacher.model, cfg.teacher.revision)
    trc = cfg.teacher.trust_remote_code
    return AutoConfig.from_pretrained(path, revision=cfg.teacher.revision, trust_remote_code=trc).vocab_size


def token_batches(samples, batch_tokens: int):
    """Group samples into engine calls of about batch_tokens tokens (at least one sample each)."""
    batch, size = [], 0
    for s in samples:
        if batch and size + len(s.input_ids) > batch_tokens:
            yield batch
            batch, size = [], 0
        batch.append(s)
        size += len(s.input_ids)
    if batch:
        yield batch


def run_shard(cfg: RunConfig, shard: int, store: CacheStore, backend, tokenizer, owner: str) -> JobSummary:
    """Fill one part. Raises PartBusy if another live process holds its lease."""
    summary = JobSummary()
    if store.part_status(shard) == "complete":
        summary.shards_skipped.append(shard)
        return summary
    t_start = time.perf_counter()
    samples = load_shard_samples(cfg, tokenizer, shard)
    n_tokens = sum(len(s.input_ids) for s in samples)
    sampled = cfg.cache.rows == "sampled"
    t_engine = 0.0
    with store.open_part_writer(shard, owner=owner) as part, tqdm(
        total=n_tokens, unit="tok", unit_scale=True, desc=f"shard {shard:05d}", dynamic_ncols=True, mininterval=1.0
    ) as bar:
        for batch in token_batches(samples, cfg.teacher.batch_tokens):
            positions = [s.positions for s in batch]
            request = ([s.input_ids for s in batch], positions)
            if sampled:
                request += ([sample_uniforms(cfg.cache.sample_seed, s.sample_id, len(pos), cfg.cache.draws)
                             for s, pos in zip(batch, positions)],)
            t0 = time.perf_counter()
            topk = backend.score(*request)
            t_engine += time.perf_counter() - t0
            for s, pos, rows in zip(batch, positions, topk):
                if sampled:  # the writer sees only the draws: check the top-K rows they came from here
                    check_teacher_rows(rows.ids, rows.logprobs, store.meta.vocab_size, pos,
                                       f"cache {store.path}: sample {s.sample_id!r}: the teacher's top-K rows the "
                                       "draws come from")
                teacher = {"draws": rows.draws} if sampled else {"topk_ids": rows.ids, "topk_logprobs": rows.logprobs}
                part.add(
                    SampleRows(
                        sample_id=s.sample_id,
                        input_ids=s.input_ids,
                        loss_mask=s.loss_mask,
                        prompt_ids=s.prompt_ids,
                        positions=pos,
                        **teacher,
                    )
                )
                summary.rows += len(pos)
            summary.samples += len(batch)
            bar.update(sum(len(s.input_ids) for s in batch))
            bar.set_postfix(samples=f"{summary.samples}/{len(samples)}", refresh=False)
        seconds = time.perf_counter() - t_start
        part.finish(
            {
                "config_hash": config_hash(cfg),
                "engine_version": backend.engine_version,
                "timings": {"total_s": round(seconds, 3), "engine_s": round(t_engine, 3)},
            }
        )
    summary.tokens = n_tokens
    summary.shards_done.append(shard)
    log.info(
        "part_complete shard=%d samples=%d tokens=%d rows=%d seconds=%.2f engine_seconds=%.2f",
        shard, summary.samples, n_tokens, summary.rows, seconds, t_engine,
    )  # fmt: skip
    return summary


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_shards(cfg: RunConfig, shards: list[int], queue=None, peers=None, tokenizer=None) -> JobSummary:
    """One worker: one engine, then shards from the list (or from a shared queue) until none is left.

    peers: a Barrier of the data-parallel ranks. A rank whose shards are done keeps its engine up until every
    rank is done: vLLM's DP engine core keeps stepping (dummy batches) while any rank has work, and the
    ranks' expert-parallel collectives need all of them. A rank that fails breaks the barrier instead, so
    the others stop rather than wait for it. tokenizer: the student's, if the caller has it loaded."""
    tokenizer = tokenizer or _student_tokenizer(cfg)
    summary = JobSummary()
    backend = make_backend(cfg.teacher, resolve_model(cfg.teacher.model, cfg.teacher.revision), cfg.cache.k)
    ok = False
    try:
        store = CacheStore.create_or_open(cfg.cache.path, root_meta(cfg, tokenizer, backend.engine_version))
        for shard in iter(queue.get, None) if queue is not None else shards:
            try:
                summary.merge(run_shard(cfg, shard, store, backend, tokenizer, _owner()))
            except PartBusy as busy:
                log.warning("part_busy shard=%d %s", shard, busy)
                summary.shards_busy.append(shard)
        ok = True
    finally:
        try:
            if peers is not None:
                peers.wait() if ok else peers.abort()
        finally:
            backend.close()
    return summary


def check_engine_options(cfg: RunConfig) -> None:
    """Refuse, in one line and before any engine starts, teacher options the installed vLLM cannot run on this
    machine, which would otherwise fail after start-up (minutes for the real teacher; DP ranks at their first
    MoE step)."""
    if cfg.teacher.backend != "vllm" or not (cfg.teacher.batch_invariant or cfg.teacher.data_parallel_size > 1):
        return
    from stage1_teacher.vllm_backend import batch_invariant_blocker, data_parallel_blocker

    blocker = cfg.teacher.batch_invariant and batch_invariant_blocker()
    if blocker:
        raise UserError(f"teacher.batch_invariant: {blocker}")
    blocker = cfg.teacher.data_parallel_size > 1 and data_parallel_blocker()
    if blocker:
        raise UserError(f"teacher.data_parallel_size={cfg.teacher.data_parallel_size}: {blocker}; set "
                        "teacher.data_parallel_size: 1 here (DP runs on GPU nodes)")


def _student_tokenizer(cfg: RunConfig):
    return load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)


def check_cache_settings(cfg: RunConfig, tokenizer=None) -> None:
    """Refuse, before any engine starts (minutes for the real teacher), a run whose settings differ from the
    existing cache's: K, encoding, rows kind, positions, vocabulary, shard count, teacher, tokenizer and
    chat-template fingerprints, data. Whether or not the requested parts are complete: a complete part
    written with other settings is not this run's result. Nothing to compare while there is no cache."""
    stored = CacheStore.existing_meta(cfg.cache.path)
    if stored is not None:
        tokenizer = tokenizer or _student_tokenizer(cfg)
        # engine_version is recorded per part, not compared: the engine need not exist yet.
        stored.require_same(root_meta(cfg, tokenizer, engine_version=""), cfg.cache.path)


def _complete_parts(path: str) -> set[int]:
    """Parts already complete (so no engine is started for them); empty if there is no cache yet."""
    try:
        return {s for s, status in CacheReader(path).part_status.items() if status == "complete"}
    except UserError:
        return set()


def _worker(cfg: RunConfig, index: int, queue, results, peers=None, dp_port: int | None = None) -> None:
    tp, dp = cfg.teacher.tensor_parallel_size, cfg.teacher.data_parallel_size
    if dp > 1:
        # vLLM's offline data parallel (its examples/offline_inference/data_parallel.py): one LLM per rank,
        # found through these variables; vLLM gives each rank's engine its own GPUs.
        os.environ.update(VLLM_DP_RANK=str(index), VLLM_DP_RANK_LOCAL=str(index), VLLM_DP_SIZE=str(dp),
                          VLLM_DP_MASTER_IP="127.0.0.1", VLLM_DP_MASTER_PORT=str(dp_port))
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is None and cfg.teacher.num_engines > 1:
        # One engine per GPU group: worker i sees GPUs [i*tp, (i+1)*tp).
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(index * tp, (index + 1) * tp))
    results.put(run_shards(cfg, [], queue, peers))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(cfg: RunConfig, shards: list[int] | None = None, num_shards: int | None = None) -> JobSummary:
    """Run the given shards (scheduler mode) or every shard, with cfg.teacher.num_engines local workers."""
    if num_shards is not None and num_shards != cfg.data.num_shards:
        raise UserError(f"--num-shards {num_shards} differs from data.num_shards {cfg.data.num_shards} in the config")
    bad = [s for s in shards or [] if not 0 <= s < cfg.data.num_shards]
    if bad:
        raise UserError(f"--shard {bad[0]}: must be in [0, {cfg.data.num_shards})")
    check_engine_options(cfg)
    if not os.path.exists(cfg.manifest):
        raise UserError(f"manifest {cfg.manifest}: not found; run `hyperdistill prepare-data` first")
    # Jobs read the samples prepare-data rendered: refuse another run's before any engine starts.
    tokenizer = _student_tokenizer(cfg)  # loaded once here (seconds for the real vocabulary), used by all three
    check_rendered(cfg, tokenizer)
    t0 = time.perf_counter()
    check_cache_settings(cfg, tokenizer)
    dp = cfg.teacher.data_parallel_size
    requested = list(shards) if shards else list(range(cfg.data.num_shards))
    done = _complete_parts(cfg.cache.path)
    shards = [s for s in requested if s not in done]
    if not shards:  # nothing to do: do not start an engine (minutes for the real teacher)
        summary = JobSummary()
    elif dp == 1 and (cfg.teacher.num_engines == 1 or len(shards) == 1):
        summary = run_shards(cfg, shards, tokenizer=tokenizer)
    else:  # several engines, or DP ranks (which all start, even with fewer shards than ranks: they step together)
        if dp > 1 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            raise UserError("teacher.data_parallel_size > 1 needs vLLM's engine processes: unset "
                            "VLLM_ENABLE_V1_MULTIPROCESSING=0")
        n_workers = max(dp, cfg.teacher.num_engines)
        ctx = mp.get_context("spawn")
        queue, results = ctx.Queue(), ctx.Queue()
        for s in shards:
            queue.put(s)
        for _ in range(n_workers):
            queue.put(None)
        dp_args = (ctx.Barrier(dp), _free_port()) if dp > 1 else ()
        workers = [ctx.Process(target=_worker, args=(cfg, i, queue, results, *dp_args)) for i in range(n_workers)]
        for w in workers:
            w.start()
        summary = JobSummary()
        received = 0
        while received < len(workers):
            try:
                summary.merge(results.get(timeout=5))
                received += 1
            except queue_mod.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:  # a worker that crashed never reports: stop instead of waiting forever
                    for w in workers:
                        w.terminate()
                    raise RuntimeError(f"stage 1 worker {dead[0].name} exited with code {dead[0].exitcode}")
        for w in workers:
            w.join()
    summary.shards_skipped.extend(s for s in requested if s in done)
    summary.seconds = time.perf_counter() - t0
    return summary
