"""Stage-1 benchmark: our teacher-cache path vs the bare vLLM engine, same prompts.

(a) End to end: `stage1_teacher.run.run_shard` (render the shard's trajectories, `backend.score`, build
    `SampleRows`, `PartWriter.add`, `finish` into a fresh cache) vs `vllm.LLM.generate` with the same
    `SamplingParams` (prompt_logprobs=K, flat log-probs, no detokenisation) on exactly the token lists the
    backend sends, with nothing converted or written. One engine instance serves both; the two runs
    alternate in each repeat and the figure is the median of the per-repeat ratios, so that load from other
    jobs on the machine hits both sides alike. On a shared machine the engine's own time swings by 2x from
    run to run, far more than what stage 1 adds, so that addition is also measured apart: `run_shard` with
    a backend that replays the recorded engine outputs (ReplayBackend: the conversion included, the engine
    excluded), giving ratio_from_parts = bare / (bare + overhead).
(b) Host cost alone: the engine's real `FlatLogprobs` (computed once) -> `flat_to_topk` -> `SampleRows` ->
    `PartWriter.add` -> `finish`, in µs per token. The outputs are replayed `copies` times under new sample
    ids, so that the part's fixed cost (arrays, lease, metadata) is spread over a shard-sized amount of rows.
    With `positions: all` (one more engine pass) every token has a row: the worst case.

Runs in its own process (`benchmarks.run` starts it): vLLM's CPU worker pins OpenMP threads and sets
torch's thread count, which would skew whatever ran after it in the same process.
    python -m benchmarks.stage1 [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.output import add_output_args, write_json

K = 128
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@dataclass(frozen=True)
class Settings:
    samples: int
    """Trajectories: the first resolved OpenHands ones of the bundled sample."""
    max_tokens: int
    """Each cut to this many tokens (data.overlong=truncate)."""
    e2e_reps: int
    """(a): alternating (bare, ours) pairs."""
    host_reps: int
    """(b): repeats of each case."""
    copies: int
    """(b): replays of the engine outputs into one part."""
    all_positions: bool
    """(b): also measure positions=all (one more engine pass)."""


FULL = Settings(samples=8, max_tokens=1000, e2e_reps=5, host_reps=3, copies=32, all_positions=True)
QUICK = Settings(samples=4, max_tokens=1000, e2e_reps=2, host_reps=2, copies=4, all_positions=False)


def write_trajectories(n: int, path: Path) -> list[str]:
    """Copy the raw rows of the first n resolved OpenHands trajectories of the bundled sample to `path`."""
    from common.config import DataConfig
    from common.trajectories import load_trajectories

    trajectories, _ = load_trajectories(DataConfig(source="sample"))
    chosen = [t for t in trajectories if t.schema == "openai"][:n]
    if len(chosen) < n:
        raise RuntimeError(f"the bundled sample has only {len(chosen)} resolved OpenHands trajectories, {n} wanted")
    lines: list[str] = []
    for t in chosen:
        file, line = t.location.rsplit(":", 1)
        lines.append(Path(file).read_text(encoding="utf-8").splitlines()[int(line) - 1])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [t.id for t in chosen]


def bench_config(tmp: Path, s: Settings):
    from common.config import load_config

    return load_config(
        DEMO_CONFIG,
        [
            f"data.source={tmp / 'trajectories.jsonl'}",
            "data.num_shards=1",
            f"data.max_tokens={s.max_tokens}",
            "data.overlong=truncate",
            f"manifest={tmp / 'manifest.jsonl'}",
            f"cache.path={tmp / 'cache.zarr'}",
            f"cache.k={K}",
            "teacher.kv_cache_gib=1",
            # vLLM's public prompt log-probs: this benchmark measures that path (the capture: benchmarks.capture).
            "teacher.capture=public",
            # Prefill chunk: each of its tokens costs a [V] fp32 logits row plus its log-softmax (~1.2 MB).
            "teacher.max_num_batched_tokens=2048",
            # One engine call for the whole shard, as in the bare runs.
            f"teacher.batch_tokens={s.samples * s.max_tokens}",
        ],
    )


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def run_ours(cfg, meta, backend, tokenizer, path: Path) -> tuple[float, dict]:
    """One stage-1 job on shard 0 into a new cache at `path`; (seconds, the part's recorded timings)."""
    from cache_schema import CacheReader, CacheStore
    from stage1_teacher.run import run_shard

    store = CacheStore.create_or_open(str(path), meta)  # a job's one-off set-up: not timed
    seconds, _ = timed(run_shard, cfg, 0, store, backend, tokenizer, "bench")
    timings = dict(CacheReader(str(path)).part_of(0).part_meta.timings)
    shutil.rmtree(path)
    return seconds, timings


class ReplayBackend:
    """A teacher backend that replays one engine call's recorded outputs, converted as VllmBackend.score
    converts them: `run_shard` with it costs everything stage 1 adds to the bare engine, and nothing else."""

    def __init__(self, outputs: list, k: int, engine_version: str, max_len: int, vocab_size: int):
        self.outputs, self.k, self.engine_version = outputs, k, engine_version
        self.max_len, self.vocab_size = max_len, vocab_size

    def score(self, sequences: list, positions: list) -> list:
        from stage1_teacher.backend import check_request
        from stage1_teacher.vllm_backend import flat_to_topk

        if len(sequences) != len(self.outputs):
            raise RuntimeError(f"replay: recorded {len(self.outputs)} outputs, asked for {len(sequences)} sequences")
        positions = check_request(sequences, positions, self.max_len, self.vocab_size)
        return [flat_to_topk(out.prompt_logprobs, pos, self.k) for out, pos in zip(self.outputs, positions)]

    def close(self) -> None:
        """Nothing to release: no engine."""


def host_cost(outputs, samples, positions, meta, path: Path, copies: int) -> dict:
    """(b): replay `outputs` (one vLLM RequestOutput per sample) through conversion + writer into one part."""
    from cache_schema import CacheStore, SampleRows
    from stage1_teacher.vllm_backend import flat_to_topk

    store = CacheStore.create_or_open(str(path), meta)
    convert = 0.0
    t0 = time.perf_counter()
    with store.open_part_writer(0, owner="bench") as part:
        for c in range(copies):
            for s, pos, out in zip(samples, positions, outputs):
                t1 = time.perf_counter()
                topk = flat_to_topk(out.prompt_logprobs, pos, K)
                convert += time.perf_counter() - t1
                part.add(
                    SampleRows(
                        sample_id=f"{s.sample_id}/copy{c}",
                        input_ids=s.input_ids,
                        loss_mask=s.loss_mask,
                        prompt_ids=s.prompt_ids,
                        positions=pos,
                        topk_ids=topk.ids,
                        topk_logprobs=topk.logprobs,
                    )
                )
        part.finish()
    total = time.perf_counter() - t0
    shutil.rmtree(path)
    return {"total_s": total, "convert_s": convert}


def run(s: Settings) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from cache_schema import stored_positions
    from common.manifest import load_shard_samples, prepare_data
    from common.models import load_tokenizer, resolve_model
    from stage1_teacher.backend import make_backend
    from stage1_teacher.run import root_meta

    with tempfile.TemporaryDirectory(prefix="bench-stage1-") as tmp_name:
        tmp = Path(tmp_name)
        write_trajectories(s.samples, tmp / "trajectories.jsonl")
        cfg = bench_config(tmp, s)
        tokenizer = load_tokenizer(cfg.student.model)
        prepare_data(cfg, tokenizer)
        samples = load_shard_samples(cfg, tokenizer, 0)
        positions = [stored_positions(x.loss_mask, cfg.cache.positions) for x in samples]
        t_start, backend = timed(make_backend, cfg.teacher, resolve_model(cfg.teacher.model), K)
        try:
            meta = root_meta(cfg, tokenizer, backend.engine_version)
            # Exactly what VllmBackend.score sends: each sequence cut after the token its last row predicts.
            sent = [x.input_ids[: p[-1] + 2].tolist() for x, p in zip(samples, positions)]
            prompts = [TokensPrompt(prompt_token_ids=ids) for ids in sent]
            params = SamplingParams(max_tokens=1, prompt_logprobs=K, detokenize=False, flat_logprobs=True)
            llm = backend._llm  # the bare engine is the backend's own instance: same weights, threads, KV cache

            def bare():
                return llm.generate(prompts, params, use_tqdm=False)

            # ---- (a) end to end vs bare engine, alternating ---------------------------------------------
            bare()  # warm-up: first-call allocations and kernel set-up, for both sides
            run_ours(cfg, meta, backend, tokenizer, tmp / "warmup.zarr")
            bare_s, ours_s, timings = [], [], []
            outputs = None
            for r in range(s.e2e_reps):
                for side in ("bare", "ours") if r % 2 == 0 else ("ours", "bare"):
                    if side == "bare":
                        seconds, outputs = timed(bare)
                        bare_s.append(seconds)
                    else:
                        seconds, part_timings = run_ours(cfg, meta, backend, tokenizer, tmp / f"rep{r}.zarr")
                        ours_s.append(seconds)
                        timings.append(part_timings)
            render_s, _ = timed(load_shard_samples, cfg, tokenizer, 0)
            # The same jobs with the engine's work replayed: what ours adds to the bare engine, measured
            # apart because it is small against the run-to-run swings of the engine on a shared machine.
            replay = ReplayBackend(outputs, K, backend.engine_version, cfg.teacher.max_model_len, backend.vocab_size)
            overhead_s = [run_ours(cfg, meta, replay, tokenizer, tmp / f"replay{r}.zarr")[0] for r in range(s.e2e_reps)]

            # ---- (b) host cost on the real engine outputs ------------------------------------------------
            cases = [("assistant", meta, samples, positions, outputs, sum(len(x) for x in sent))]
            if s.all_positions:
                full = [TokensPrompt(prompt_token_ids=x.input_ids.tolist()) for x in samples]
                full_out = llm.generate(full, params, use_tqdm=False)
                all_pos = [stored_positions(x.loss_mask, "all") for x in samples]
                n_full = sum(len(x.input_ids) for x in samples)
                cases.append(("all", replace(meta, positions="all"), samples, all_pos, full_out, n_full))
            host = []
            for name, case_meta, xs, pos, outs, n_tokens in cases:
                reps = [host_cost(outs, xs, pos, case_meta, tmp / f"host-{name}.zarr", s.copies)
                        for _ in range(s.host_reps)]
                tokens = n_tokens * s.copies
                rows = sum(len(p) for p in pos) * s.copies
                total = statistics.median(x["total_s"] for x in reps)
                convert = statistics.median(x["convert_s"] for x in reps)
                host.append({
                    "positions": name, "tokens": tokens, "rows": rows, "total_s": [x["total_s"] for x in reps],
                    "us_per_token": total / tokens * 1e6, "us_per_row": total / rows * 1e6,
                    "convert_us_per_token": convert / tokens * 1e6,
                    "writer_us_per_token": (total - convert) / tokens * 1e6,
                })  # fmt: skip
            engine_version = backend.engine_version
        finally:
            backend.close()

    n_sent = sum(len(x) for x in sent)
    ratios = [b / o for b, o in zip(bare_s, ours_s)]
    bare_median, overhead = statistics.median(bare_s), statistics.median(overhead_s)
    return {
        "settings": asdict(s),
        "k": K,
        "engine": engine_version,
        "teacher": cfg.teacher.model,
        "encoding": cfg.cache.encoding,
        "engine_start_s": t_start,
        "samples": len(samples),
        "sample_tokens": sum(len(x.input_ids) for x in samples),
        "tokens_sent": n_sent,
        "rows": sum(len(p) for p in positions),
        "e2e": {
            "bare_s": bare_s,
            "ours_s": ours_s,
            "ratios": ratios,
            "ratio": statistics.median(ratios),
            "bare_tokens_per_s": n_sent / bare_median,
            "ours_tokens_per_s": n_sent / statistics.median(ours_s),
            "score_s": statistics.median(t["engine_s"] for t in timings),
            "writer_busy_s": statistics.median(t["writer_busy_s"] for t in timings),
            "render_s": render_s,
            "overhead_s": overhead_s,
            "ratio_from_parts": bare_median / (bare_median + overhead),
        },
        "host": host,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser, "fewer samples and repeats (a smoke run)")
    args = parser.parse_args(argv)
    # Before vLLM is imported: engine core and worker in this process (start-up in seconds, no spawn),
    # and an explicit KV cache size, which also skips vLLM's warm-up pass.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(QUICK if args.quick else FULL)
    write_json(result, args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
