"""Stage-1 capture benchmark: vLLM's public prompt log-probs vs the engine capture, same prompts, same engine.

(a) Driver host cost and engine wall time. One `vllm.LLM` with its engine core and worker in their own
    processes (vLLM's default layout, so that the driver's CPU time is the front end's and ours alone) and the
    capture installed; `capture: public` requests go to vLLM's own prompt-log-prob method on the same engine.
    Each repeat runs both paths' `backend.score` on the bundled trajectories (assistant positions, the
    cache's rows), order alternating; per path: the driver process's CPU seconds (time.process_time, every
    thread of this process) and wall seconds, per token sent to the engine. Top-K rows, and sampled rows
    (public: draws over the top-K on the host, tail draws unnamed; capture: exact draws in the worker).
(b) lm_head part, peak memory at V = 151,936: R prefill rows through lm_head (float32) then either a full
    fp32 log-softmax (what vLLM's public path computes for every prompt position) + top-K, or the capture's
    row chunks (logsumexp + top-K per chunk of 256 rows). Each in a fresh process: peak RSS (ru_maxrss) after
    it minus the resident set just before it, inputs (hidden states, lm_head weight) already allocated.

Runs in its own process (`benchmarks.run` starts it).
    python -m benchmarks.capture [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.output import add_output_args, write_json

K = 128
VOCAB = 151_936


@dataclass(frozen=True)
class Settings:
    samples: int
    """Bundled OpenHands trajectories (benchmarks.stage1.write_trajectories)."""
    max_tokens: int
    """Each cut to this many tokens."""
    reps: int
    """(a): repeats of each path, alternating."""
    draws: int
    """(a): N of the sampled-row runs."""
    rows: int
    """(b): prefill rows through lm_head."""
    hidden: int
    """(b): lm_head input width."""


FULL = Settings(samples=8, max_tokens=1000, reps=3, draws=64, rows=2048, hidden=256)
QUICK = Settings(samples=4, max_tokens=1000, reps=1, draws=64, rows=1024, hidden=256)


def engine_runs(s: Settings) -> dict:
    from benchmarks.stage1 import bench_config, write_trajectories
    from cache_schema import stored_positions
    from common.manifest import load_shard_samples, prepare_data
    from common.models import load_tokenizer, resolve_model
    from stage1_teacher.capture_backend import CaptureBackend
    from stage1_teacher.sampling import sample_uniforms
    from stage1_teacher.vllm_backend import VllmBackend

    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp_name:
        tmp = Path(tmp_name)
        write_trajectories(s.samples, tmp / "trajectories.jsonl")
        cfg = bench_config(tmp, s)
        cfg.teacher.capture = "engine"
        tokenizer = load_tokenizer(cfg.student.model)
        prepare_data(cfg, tokenizer)
        samples = load_shard_samples(cfg, tokenizer, 0)
    seqs = [x.input_ids for x in samples]
    positions = [stored_positions(x.loss_mask, cfg.cache.positions) for x in samples]
    uniforms = [sample_uniforms(0, x.sample_id, len(p), s.draws) for x, p in zip(samples, positions)]
    sent = sum(int(p[-1]) + 2 for p in positions if len(p))
    t0 = time.perf_counter()
    capture = CaptureBackend(cfg.teacher, resolve_model(cfg.teacher.model), K)
    start_s = time.perf_counter() - t0
    public = VllmBackend(cfg.teacher, "", K, llm=capture._llm)
    paths = {"public": public, "capture": capture}
    out: dict = {"engine": capture.engine_version, "engine_start_s": start_s, "tokens_sent": sent,
                 "rows": sum(len(p) for p in positions), "samples": len(samples)}
    try:
        for kind, request in (("topk", (seqs, positions)), ("sampled", (seqs, positions, uniforms))):
            for backend in paths.values():  # warm-up: first-call allocations, for both paths
                backend.score(*request)
            cpu = {name: [] for name in paths}
            wall = {name: [] for name in paths}
            for r in range(s.reps):
                for name in (("public", "capture") if r % 2 == 0 else ("capture", "public")):
                    c0, w0 = time.process_time(), time.perf_counter()
                    paths[name].score(*request)
                    cpu[name].append(time.process_time() - c0)
                    wall[name].append(time.perf_counter() - w0)
            out[kind] = {
                name: {"cpu_s": cpu[name], "wall_s": wall[name],
                       "host_us_per_token": statistics.median(cpu[name]) / sent * 1e6,
                       "tokens_per_s": sent / statistics.median(wall[name])}
                for name in paths
            }  # fmt: skip
            # Speed of the capture relative to the public path: median of per-repeat wall-time ratios.
            out[kind]["speed_ratio"] = statistics.median(p / c for p, c in zip(wall["public"], wall["capture"]))
    finally:
        capture.close()
    return out


MEMORY_CHILD = """
import resource, sys, torch
torch.set_num_threads(1)
variant, rows, hidden, vocab, k = sys.argv[1], *map(int, sys.argv[2:6])
g = torch.Generator().manual_seed(0)
# float32 inputs: the CPU's bf16 matmul upcasts the whole weight to a temporary, which would hide the logits'
# share (the quantity compared here) behind a weight-sized constant.
h = torch.randn(rows, hidden, generator=g)
w = torch.randn(vocab, hidden, generator=g) * 0.05
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
if variant == "full":  # vLLM's public path: the prefill chunk's logits, their fp32 log-softmax, top-K
    logits = h @ w.T
    lp = logits.log_softmax(dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
else:  # the capture: row chunks of 256, logsumexp + top-K on each
    for a in range(0, rows, 256):
        x = h[a:a + 256] @ w.T
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        vals, ids = torch.topk(x, k, dim=-1)
        vals = vals - lse
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(max(peak - before, 0))
"""


def lm_head_memory(s: Settings) -> dict:
    """Peak bytes beyond the inputs of each variant, each in a fresh process."""
    out = {}
    for variant in ("full", "chunked"):
        cmd = [sys.executable, "-c", MEMORY_CHILD, variant, str(s.rows), str(s.hidden), str(VOCAB), str(K)]
        t0 = time.perf_counter()
        peak = int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
        out[variant] = {"peak_bytes": peak, "seconds": time.perf_counter() - t0}
    out["rows"], out["hidden"], out["vocab"] = s.rows, s.hidden, VOCAB
    # What the two must hold at least: full = fp32 logits + fp32 log-softmax of every row; chunked = the same
    # for 256 rows (the logsumexp's temporary in place of the log-softmax).
    out["full_lower_bound_bytes"] = s.rows * VOCAB * (4 + 4)
    out["chunked_lower_bound_bytes"] = min(s.rows, 256) * VOCAB * (4 + 4)
    return out


def run(s: Settings) -> dict:
    return {"settings": asdict(s), "k": K, "engine": engine_runs(s), "lm_head": lm_head_memory(s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser, "fewer samples and repeats (a smoke run)")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # explicit KV size: no warm-up pass, little memory
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The engine core and worker in their own processes (vLLM's default): the driver's CPU time is its own.
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    result = run(QUICK if args.quick else FULL)
    write_json(result, args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
