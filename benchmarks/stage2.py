"""Stage-2 benchmarks, on CPU.

(a) The distillation loss (`stage2_student.losses.topk_distill_loss`: lm_head + logsumexp + gather in row
    chunks, recomputed in backward) vs the naive loss (lm_head over all rows into a full fp32 [R, V] logits
    tensor, full log_softmax, gather, then the same KL), forward + backward, at the real student's
    H = 2048 and V = 151,936, K = 128, bf16 hidden states and lm_head (frozen: no weight gradient), fp32
    logits in both.
    Peak memory: one forward + backward in a fresh process each (`loss-worker`): ru_maxrss after it minus
    the resident set just before it (inputs already built), i.e. what the loss adds beyond its inputs.
    The naive loss at R = 8192 needs ~16 GB here, more than this 24 GiB machine has free beside other
    jobs, so both are measured at two smaller R and fitted linearly in R; the R = 8192 figures are that
    extrapolation and are labelled so.
    Time: both losses alternating in one process at a smaller R (both are GEMM-bound, so the ratio hardly
    depends on R), one thread (TIMING_THREADS), median over repeats.
(b) One training step (forward, backward, AdamW) of the tiny student on one batch:
    - plain: the student without LoRA; a trainable zero vector added to its input embeddings stands in
      for the hypernetwork, so that backward runs through every block as it must with LoRA;
    - lora_fixed: per-sample LoRA (LoRAInjector) with fixed trainable A, B: the cost of injection alone;
    - hypernet: the trainer's DistillModel (model.build_distill_model): hypernetwork(prompt) -> per-sample
      LoRA -> student -> loss.
    All three with the demo config's activation checkpointing, loss chunk and hypernetwork; one thread;
    alternating, median over repeats.

    python -m benchmarks.stage2 [--quick] [--json out.json]
    python -m benchmarks.stage2 loss-worker --variant chunked --rows 8192 --chunk 1024   # one peak, directly
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.output import add_output_args, write_json

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

HIDDEN, VOCAB, K = 2048, 151_936, 128
TARGET_ROWS = 8192


@dataclass(frozen=True)
class Settings:
    loss_chunks: tuple[int, ...]
    """(a): rows per lm_head chunk of the chunked loss, each measured (train.loss_chunk: 1024 by default, 512
    in the demo config); the first is also the one timed."""
    mem_rows: tuple[int, ...]
    """(a): R of the fresh-process peak-memory runs: two or more, each at least the largest chunk (below it
    the chunk is R itself and the peak still grows like the naive loss's), for the linear fit."""
    time_rows: int
    """(a): R of the timing runs."""
    loss_reps: int
    """(a): alternating (naive, chunked) timing pairs."""
    seq_lens: tuple[int, ...]
    """(b): tokens per sample (one measurement each)."""
    step_reps: int
    """(b): alternating rounds of the three step variants."""


FULL = Settings(loss_chunks=(1024, 512), mem_rows=(1024, 2048), time_rows=256, loss_reps=3,
                seq_lens=(1024, 2048), step_reps=4)
QUICK = Settings(loss_chunks=(256,), mem_rows=(256, 512), time_rows=256, loss_reps=2, seq_lens=(1024,),
                 step_reps=3)
# Timed runs use one thread. On this shared 2-core machine, two OpenMP threads made step times swing 5-20x
# whenever another job took a core (each parallel region waits at its barrier for the descheduled thread);
# with one thread a busy neighbour slows every variant alike and the ratios hold.
TIMING_THREADS = 1


# ---- (a) the loss ---------------------------------------------------------------------------------------


def loss_inputs(rows: int, seed: int = 0):
    """hidden [R, H] bf16 (requires grad), lm_head [V, H] bf16, teacher ids [R, K] int64, log-probs [R, K]."""
    from cache_schema.synthetic import zipf_topk_rows

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, HIDDEN, generator=g).to(torch.bfloat16).requires_grad_()
    # Filled in slices: a whole fp32 [V, H] temporary (1.2 GB) would raise the process's peak before the
    # measurement starts.
    weight = torch.empty(VOCAB, HIDDEN, dtype=torch.bfloat16)
    for s in range(0, VOCAB, 8192):
        weight[s : s + 8192] = torch.randn(min(8192, VOCAB - s), HIDDEN, generator=g) * HIDDEN**-0.5
    ids, logprobs = zipf_topk_rows(np.random.default_rng(seed), rows, K, VOCAB)
    return hidden, weight, torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(logprobs)


def naive_loss(hidden, weight, topk_ids, teacher_logprobs, chunk: int) -> torch.Tensor:
    """Per-row forward KL with tail bucket, the obvious way: full fp32 logits [R, V] and log_softmax
    (`chunk` unused: the same signature as chunked_loss)."""
    from stage2_student.losses import kl_from_logprobs

    logits = hidden.float() @ weight.float().T
    student_logp = torch.log_softmax(logits, dim=-1).gather(1, topk_ids)
    return kl_from_logprobs(student_logp, teacher_logprobs, "forward_tail")


def chunked_loss(hidden, weight, topk_ids, teacher_logprobs, chunk: int) -> torch.Tensor:
    from stage2_student.losses import topk_distill_loss

    return topk_distill_loss(hidden, weight, topk_ids, teacher_logprobs, "forward_tail", chunk=chunk).loss


LOSSES = {"naive": naive_loss, "chunked": chunked_loss}


def fwd_bwd(variant: str, inputs, chunk: int) -> tuple[float, torch.Tensor]:
    """(seconds, mean loss) of one forward + backward; the gradient w.r.t. hidden is dropped afterwards."""
    hidden = inputs[0]
    hidden.grad = None
    t0 = time.perf_counter()
    loss = LOSSES[variant](*inputs, chunk).mean()
    loss.backward()
    seconds = time.perf_counter() - t0
    hidden.grad = None
    return seconds, loss.detach()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def loss_memory_worker(variant: str, rows: int, chunk: int) -> dict:
    """In a fresh process: the peak memory one forward + backward adds beyond its inputs."""
    inputs = loss_inputs(rows)
    before = _resident_bytes()
    seconds, loss = fwd_bwd(variant, inputs, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"variant": variant, "rows": rows, "chunk": chunk if variant == "chunked" else None,
            "peak_bytes": max(0, peak - before), "seconds": seconds, "loss": float(loss)}


def measure_loss_memory(variant: str, rows: int, chunk: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.stage2", "loss-worker", "--variant", variant, "--rows", str(rows),
           "--chunk", str(chunk)]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_losses(rows: int, reps: int, chunk: int) -> dict:
    """Both losses alternating on the same inputs; also checks that they agree."""
    small = loss_inputs(64, seed=1)
    for variant in LOSSES:  # warm-up: kernel selection, first allocations
        fwd_bwd(variant, small, chunk)
    inputs = loss_inputs(rows)
    seconds: dict[str, list[float]] = {v: [] for v in LOSSES}
    losses = {}
    for r in range(reps):
        for variant in ("naive", "chunked") if r % 2 == 0 else ("chunked", "naive"):
            s, losses[variant] = fwd_bwd(variant, inputs, chunk)
            seconds[variant].append(s)
    if not torch.allclose(losses["naive"], losses["chunked"], rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"the two losses disagree: naive {losses['naive']}, chunked {losses['chunked']}")
    ratios = [c / n for c, n in zip(seconds["chunked"], seconds["naive"])]
    return {"rows": rows, "chunk": chunk, "threads": torch.get_num_threads(), "seconds": seconds, "ratios": ratios,
            "ratio": statistics.median(ratios)}


def linear_fit(points: list[tuple[int, int]], at: int) -> float:
    """Least-squares line through (rows, bytes) points, evaluated at `at`."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope * at + intercept)


def bench_loss(s: Settings) -> dict:
    cases = [("naive", s.loss_chunks[0])] + [("chunked", c) for c in s.loss_chunks]
    memory = [measure_loss_memory(v, r, c) for r in s.mem_rows for v, c in cases]
    fits = []
    for v, c in cases:
        points = [(m["rows"], m["peak_bytes"]) for m in memory if m["variant"] == v and m["chunk"] in (None, c)]
        fits.append({"variant": v, "chunk": c if v == "chunked" else None, "rows": TARGET_ROWS,
                     "peak_bytes": linear_fit(points, TARGET_ROWS)})  # fmt: skip
    for f in fits:
        f["ratio_to_naive"] = f["peak_bytes"] / fits[0]["peak_bytes"]
    torch.set_num_threads(TIMING_THREADS)
    return {
        "hidden": HIDDEN, "vocab": VOCAB, "k": K, "dtype": "bfloat16 inputs, fp32 logits", "memory": memory,
        "extrapolated": fits, "time": time_losses(s.time_rows, s.loss_reps, s.loss_chunks[0]),
    }  # fmt: skip


# ---- (b) the training step --------------------------------------------------------------------------------


def step_batch(seq_len: int, batch_size: int):
    """A batch of the first `batch_size` bundled trajectories cut to seq_len, with synthetic teacher rows at
    their assistant positions (the step's cost does not depend on the teacher's values)."""
    from cache_schema import stored_positions
    from cache_schema.synthetic import zipf_topk_rows
    from common.config import DataConfig
    from common.models import load_tokenizer
    from common.rendering import render_trajectory
    from common.trajectories import load_trajectories
    from stage2_student.data import collate

    tokenizer = load_tokenizer("tiny-student")
    data = DataConfig(source="sample")
    trajectories, _ = load_trajectories(data)
    rng = np.random.default_rng(0)
    items = []
    for traj in trajectories[:batch_size]:
        sample = render_trajectory(traj, tokenizer, data)
        positions = stored_positions(sample.loss_mask, "assistant")
        positions = positions[positions + 1 < seq_len]  # as stage2_student.data cuts a sample to its phase
        ids, logprobs = zipf_topk_rows(rng, len(positions), K, VOCAB)
        items.append({"input_ids": sample.input_ids[:seq_len], "prompt_ids": sample.prompt_ids,
                      "positions": positions, "topk_ids": ids, "topk_logprobs": logprobs})  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return collate(items, pad)


class PlainStep:
    """The student without LoRA; a trainable zero vector on the input embeddings makes backward run
    through every block, as it does with LoRA on every layer."""

    def __init__(self, cfg):
        from common.models import load_causal_lm
        from stage2_student.distributed import apply_activation_checkpointing

        self.cfg = cfg
        self.student = load_causal_lm(cfg.student.model, cfg.student.dtype).requires_grad_(False)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(self.student)
        self.student.train()
        self.stand_in = torch.nn.Parameter(torch.zeros(self.student.config.hidden_size))
        self.optimizer = torch.optim.AdamW([self.stand_in], lr=cfg.train.lr)

    def __call__(self, batch) -> float:
        from stage2_student.losses import topk_distill_loss

        embeds = self.student.get_input_embeddings()(batch.input_ids) + self.stand_in.to(torch.bfloat16)
        hidden = self.student.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        out = topk_distill_loss(hidden[batch.row_sample, batch.row_position], self.student.lm_head.weight,
                                batch.topk_ids, batch.topk_logprobs, chunk=self.cfg.train.loss_chunk)
        return _finish_step(out.loss, self.optimizer)


class LoRAStep:
    """Per-sample LoRA: from the hypernetwork (the trainer's DistillModel) or from fixed trainable A, B."""

    def __init__(self, cfg, batch_size: int, fixed: bool):
        from common.models import load_causal_lm
        from stage2_student.distributed import apply_activation_checkpointing
        from stage2_student.model import build_distill_model

        self.cfg, self.fixed = cfg, fixed
        student = load_causal_lm(cfg.student.model, cfg.student.dtype).requires_grad_(False)
        self.model = build_distill_model(cfg, student)
        self.hypernet, self.injector, targets = self.model.hypernet, self.model.injector, self.model.targets
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(student)
        self.model.train()
        self.n_targets = len(targets)
        self.hypernet_params = sum(p.numel() for p in self.hypernet.parameters())
        if fixed:
            g = torch.Generator().manual_seed(0)
            r = cfg.hyper.rank
            self.lora = {
                t.name: (
                    (torch.randn(batch_size, r, t.in_features, generator=g) / t.in_features**0.5).requires_grad_(),
                    (torch.randn(batch_size, t.out_features, r, generator=g) * 0.01).requires_grad_(),
                )
                for t in targets
            }
            params = [x for pair in self.lora.values() for x in pair]
        else:
            params = list(self.hypernet.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)

    def __call__(self, batch) -> float:
        from stage2_student.losses import topk_distill_loss

        if self.fixed:
            student = self.model.student
            with self.injector.weights(self.lora):
                hidden = student.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
                out = topk_distill_loss(hidden[batch.row_sample, batch.row_position], student.lm_head.weight,
                                        batch.topk_ids, batch.topk_logprobs, chunk=self.cfg.train.loss_chunk)
                return _finish_step(out.loss, self.optimizer)
        with self.model.lora_scope():
            return _finish_step(self.model(batch).loss, self.optimizer)


def _finish_step(row_loss: torch.Tensor, optimizer) -> float:
    """Mean over rows, backward, optimizer step; returns the loss."""
    row_loss.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(row_loss.detach().mean())


def time_steps(steps: dict, batch, reps: int) -> dict:
    names = list(steps)
    for name in names:  # warm-up: kernel selection, optimizer state, first allocations
        steps[name](batch)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            t0 = time.perf_counter()
            steps[name](batch)
            seconds[name].append(time.perf_counter() - t0)
    ratios = {n: [x / p for x, p in zip(seconds[n], seconds["plain"])] for n in names if n != "plain"}
    return {
        "seq_len": int(batch.input_ids.shape[1]), "rows": int(batch.topk_ids.shape[0]), "seconds": seconds,
        "median_s": {n: statistics.median(v) for n, v in seconds.items()},
        "ratio": {n: statistics.median(v) for n, v in ratios.items()},
    }  # fmt: skip


def bench_step(s: Settings) -> dict:
    from common.config import load_config

    torch.set_num_threads(TIMING_THREADS)
    cfg = load_config(DEMO_CONFIG)
    hyper = LoRAStep(cfg, cfg.train.batch_size, fixed=False)
    steps = {"plain": PlainStep(cfg), "lora_fixed": LoRAStep(cfg, cfg.train.batch_size, fixed=True),
             "hypernet": hyper}  # fmt: skip
    return {
        "student": cfg.student.model, "dtype": cfg.student.dtype, "batch_size": cfg.train.batch_size,
        "loss_chunk": cfg.train.loss_chunk, "activation_checkpointing": cfg.train.activation_checkpointing,
        "rank": cfg.hyper.rank, "targets": hyper.n_targets, "hypernet_params": hyper.hypernet_params,
        "threads": torch.get_num_threads(),
        "runs": [time_steps(steps, step_batch(n, cfg.train.batch_size), s.step_reps) for n in s.seq_lens],
    }  # fmt: skip


def run(s: Settings) -> dict:
    return {"settings": asdict(s), "memory_threads": torch.get_num_threads(), "loss": bench_loss(s),
            "step": bench_step(s)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("loss-worker", help="(internal) one peak-memory measurement in this fresh process")
    worker.add_argument("--variant", choices=sorted(LOSSES), required=True)
    worker.add_argument("--rows", type=int, required=True)
    worker.add_argument("--chunk", type=int, required=True)
    add_output_args(parser, "smaller sizes and fewer repeats (a smoke run)")
    args = parser.parse_args(argv)
    if args.command == "loss-worker":
        print(json.dumps(loss_memory_worker(args.variant, args.rows, args.chunk)))
        return 0
    result = run(QUICK if args.quick else FULL)
    write_json(result, args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
