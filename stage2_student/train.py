"""Stage 2: train the hypernetwork against the teacher cache; the student stays frozen.

Run under torchrun (`hyperdistill train-student --nproc N` launches it):
    torchrun --nproc_per_node 8 -m hyperdistill.cli train-worker --config configs/qwen3_coder.yaml

Per step: prompt -> hypernetwork -> per-sample LoRA (A, B) for every target linear -> frozen student
forward with the LoRA hooks -> hidden states at the cached rows -> chunked lm_head + logsumexp + gather
-> top-K KL to the teacher -> backward into the hypernetwork only.

Sampled caches (cache.rows = "sampled"): rows of N teacher draws at T = 1. With train.loss = forward_tail
and temperature 1 the loss on them is the RS-KD loss, an unbiased estimate of the full-vocabulary forward
KL's gradient when every draw is named (support 'full'; losses.py); any other loss or temperature would be
biased, so those are refused, and a cache whose tail draws are unnamed (vLLM's top-K support) is warned about.

A resident teacher (train.online_teacher / train.eval_teacher): `ResidentTeacher` loads teacher.model in
stage 2, frozen, and every rank holds a whole copy outside the FSDP-wrapped DistillModel. It exists for
small teachers (the demo's tiny one, experiments such as benchmarks/teach.py): the cache's whole point is
that a big teacher never has to sit beside the student. online_teacher trains on the exact forward KL over
the full vocabulary at the cached rows (the ideal the cached losses approximate); eval_teacher adds that
KL and the top-1 agreement with the teacher's argmax ("kl_full", "top1_full") to every held-out evaluation.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from cache_schema import CacheReader
from common.config import RunConfig, config_hash, load_config, save_resolved, to_dict
from common.errors import UserError
from common.models import load_causal_lm, load_tokenizer, resolve_model
from common.tokenizer import chat_template_fingerprint, tokenizer_fingerprint
from stage2_student import checkpoint, distributed
from stage2_student.data import make_loader, phase_order, rank_batches, split_indices
from stage2_student.hypernet import HyperNetwork
from stage2_student.lora import LoRAInjector
from stage2_student.losses import DistillOutput, full_vocab_kl, topk_distill_loss
from stage2_student.metrics import MetricsLogger
from stage2_student.targets import resolve_targets


class DistillModel(nn.Module):
    """The frozen student, the hypernetwork and the loss in one module, so that FSDP2 gathers the
    student's embedding table and lm_head (root unit) exactly while they are used."""

    def __init__(self, student: nn.Module, hypernet: HyperNetwork, injector: LoRAInjector, cfg: RunConfig):
        super().__init__()
        self.student, self.hypernet, self.injector = student, hypernet, injector
        self.loss_kind, self.temperature, self.chunk = cfg.train.loss, cfg.train.temperature, cfg.train.loss_chunk

    def forward(self, batch, loss_kind: str | None = None, teacher_rows: TeacherRows | None = None) -> DistillOutput:
        """The cached top-K loss (`loss_kind`, default train.loss) at the batch's rows; with `teacher_rows`
        (the teacher's hidden states at the same rows) the full-vocabulary forward KL to them instead."""
        with torch.no_grad():  # the prompt encoder reads the student's own (frozen) embeddings
            prompt_embeds = self.student.get_input_embeddings()(batch.prompt_ids).float()
        lora = self.hypernet(prompt_embeds, batch.prompt_mask)
        # The weights stay set through backward (checkpointed blocks recompute their forward there);
        # the trainer clears them after the step.
        self.injector.set(lora)
        # Right padding needs no attention mask: causal attention and the causal DeltaNet recurrence
        # never let a real token see a later pad.
        hidden = self.student.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # [N, T, H]
        rows = hidden[batch.row_sample, batch.row_position]  # [R, H]
        if teacher_rows is not None:
            weight = self.student.lm_head.weight
            return full_vocab_kl(rows, weight, teacher_rows.hidden, teacher_rows.weight, self.chunk, self.temperature)
        return topk_distill_loss(
            rows,
            self.student.lm_head.weight,
            batch.topk_ids,
            batch.topk_logprobs,
            kind=loss_kind or self.loss_kind,
            temperature=self.temperature,
            chunk=self.chunk,
        )


class TeacherRows(NamedTuple):
    hidden: torch.Tensor
    """[R, Ht] the teacher's final-norm hidden states at the batch's rows."""
    weight: torch.Tensor
    """[V, Ht] the teacher's lm_head."""


class ResidentTeacher:
    """The teacher model, frozen, whole on every rank, for online distillation and full-vocabulary eval.

    Deliberately not an nn.Module attribute of DistillModel: FSDP2 must neither shard nor gather it, and the
    optimizer and checkpoints must never see it. Small teachers only (see the module docstring)."""

    def __init__(self, cfg: RunConfig, student_vocab: int, device: torch.device):
        t = cfg.teacher
        model = load_causal_lm(t.model, t.dtype, t.revision, t.trust_remote_code, device=str(device))
        model.requires_grad_(False)
        vocab = model.get_output_embeddings().weight.shape[0]
        if vocab != student_vocab:
            raise UserError(
                f"teacher.model {t.model}: vocabulary of {vocab} ids differs from the student's {student_vocab}: "
                "a full-vocabulary KL needs the same ids on both sides"
            )
        self.decoder, self.lm_head = model.base_model, model.get_output_embeddings()

    @torch.no_grad()
    def rows(self, batch) -> TeacherRows:
        # Right padding needs no mask here either (causal): see DistillModel.forward.
        hidden = self.decoder(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # [N, T, Ht]
        return TeacherRows(hidden[batch.row_sample, batch.row_position], self.lm_head.weight)


def check_sampled_rows(reader: CacheReader, cfg: RunConfig) -> None:
    """Sampled rows are draws from the teacher at T = 1: only forward_tail at T = 1 (RS-KD) is unbiased on them."""
    sampled = getattr(reader.meta, "sampled", None)
    if sampled is None or cfg.train.online_teacher:  # online, the rows' contents are not the loss
        return
    if cfg.train.loss != "forward_tail" or cfg.train.temperature != 1.0:
        raise UserError(
            f"cache {reader.path}: sampled rows ({sampled.draws} draws at T=1) need train.loss=forward_tail and "
            f"train.temperature=1.0 (got {cfg.train.loss}, {cfg.train.temperature}): only the forward "
            "cross-entropy on draws from the teacher is unbiased"
        )
    if sampled.support_k is not None:
        logging.getLogger("hyperdistill.stage2").warning(
            "cache %s: sampled rows with support top-%d (vLLM): draws beyond the teacher's top-K are unnamed, "
            "so the target is slightly biased toward the drawn ids (see cache_schema.format)", reader.path,
            sampled.support_k,
        )


@dataclass
class Plan:
    """Per phase, this rank's batches (lists of cache indices) and the global step at which it starts."""

    batches: list[list[list[int]]]
    starts: list[int]
    total_steps: int


def plan_phases(cfg: RunConfig, train_idx: list[int], env) -> Plan:
    batches, starts, step = [], [], 0
    per_step = cfg.train.grad_accum
    for p, phase in enumerate(cfg.train.phases):
        order = phase_order(train_idx, phase.samples, phase.epochs, cfg.train.seed, p)
        micro = rank_batches(order, cfg.train.batch_size, env.rank, env.world_size)
        micro = micro[: len(micro) // per_step * per_step]
        batches.append(micro)
        starts.append(step)
        step += len(micro) // per_step
    if cfg.train.max_steps is not None:
        step = min(step, cfg.train.max_steps)
    if step == 0:
        raise UserError(
            f"train: no optimizer step fits: {len(train_idx)} training samples for batch_size={cfg.train.batch_size} "
            f"x {env.world_size} ranks x grad_accum={cfg.train.grad_accum}"
        )
    return Plan(batches, starts, step)


def lr_at(step: int, cfg: RunConfig, plan: Plan) -> float:
    """Linear warmup, then cosine to min_lr_ratio over all phases; a phase's `lr` rescales its peak."""
    t = cfg.train
    phase = max(i for i, s in enumerate(plan.starts) if s <= step) if plan.starts else 0
    peak = t.phases[phase].lr if t.phases[phase].lr is not None else t.lr
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, plan.total_steps - t.warmup_steps)
    return peak * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_compatible(reader: CacheReader, tokenizer, student_name: str) -> None:
    """Refuse a cache rendered with another tokenizer or chat template: never train on mismatched ids."""
    meta = reader.meta
    ours = {"tokenizer": tokenizer_fingerprint(tokenizer), "chat template": chat_template_fingerprint(tokenizer)}
    theirs = {"tokenizer": meta.tokenizer.fingerprint, "chat template": meta.chat_template_fingerprint}
    for what in ours:
        if ours[what] != theirs[what]:
            raise UserError(
                f"cache {reader.path}: {what} fingerprint {theirs[what][:19]} differs from student {student_name}'s "
                f"{ours[what][:19]}: re-run stage 1 with this student's tokenizer"
            )


def eval_batches(heldout_idx: list[int], batch_size: int, env) -> tuple[list[list[int]], list[bool]]:
    """This rank's held-out batches and whether each counts. Every rank runs the same number of forwards
    (FSDP's collectives must match): ranks with fewer batches repeat one and do not count it."""
    batches = [heldout_idx[i : i + batch_size] for i in range(0, len(heldout_idx), batch_size)]
    mine = batches[env.rank :: env.world_size]
    per_rank = math.ceil(len(batches) / env.world_size)
    pad = per_rank - len(mine)
    return mine + batches[:1] * pad, [True] * len(mine) + [False] * pad


@torch.no_grad()
def evaluate(
    model: DistillModel, loader, counted: list[bool], env, teacher: ResidentTeacher | None = None
) -> dict[str, float]:
    """Held-out forward KL (tail bucket) to the cache, top-1 agreement and tail mass, summed over rows on all
    ranks; with a resident teacher also the full-vocabulary KL to it ("kl_full") and top-1 agreement with its
    argmax ("top1_full"). Both KLs at train.temperature, like the training loss."""
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)
    for batch, count in zip(loader, counted):
        batch = batch.to(env.device)
        out = model(batch, loss_kind="forward_tail")
        model.injector.clear()
        full = None
        if teacher is not None:
            # A second student forward: the lm_heads dominate its cost, and each loss needs its own anyway.
            full = model(batch, teacher_rows=teacher.rows(batch))
            model.injector.clear()
        if not count:
            continue
        sums += torch.tensor(
            [out.loss.sum().item(), out.top1_agree.sum().item(), out.student_tail.sum().item(), out.loss.numel(),
             full.loss.sum().item() if full is not None else 0.0,
             full.top1_agree.sum().item() if full is not None else 0.0],
            dtype=torch.float64,
        )  # fmt: skip
    sums = distributed.all_reduce_sum(sums.to(env.device)).cpu()
    model.train()
    rows = max(sums[3].item(), 1.0)
    result = {"kl": sums[0].item() / rows, "top1": sums[1].item() / rows, "tail": sums[2].item() / rows, "rows": rows}
    if teacher is not None:
        result.update(kl_full=sums[4].item() / rows, top1_full=sums[5].item() / rows)
    return result


def train(cfg: RunConfig, env) -> dict[str, float]:
    torch.manual_seed(cfg.train.seed)
    log = MetricsLogger(cfg.train.output_dir, enabled=env.is_main)
    if env.is_main:
        save_resolved(cfg, cfg.train.output_dir)

    # ---- data: the cache, split by a stable hash into train / held-out -----------------------------
    reader = CacheReader(cfg.cache.path)
    tokenizer = load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    check_compatible(reader, tokenizer, cfg.student.model)
    check_sampled_rows(reader, cfg)
    train_idx, heldout_idx = split_indices(reader.sample_ids, cfg.data.heldout_fraction)
    plan = plan_phases(cfg, train_idx, env)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pin = env.device.type == "cuda"

    # ---- models: frozen student (bf16), hypernetwork (fp32), LoRA hooks, FSDP2 ---------------------
    # Rank 0 reads the weights; other ranks build it on the meta device (distributed.py's docstring).
    student, full_state = distributed.load_student(cfg.student, env)
    targets = resolve_targets(student, cfg.hyper.targets)
    hypernet = HyperNetwork(cfg.hyper, targets, embed_dim=student.config.hidden_size, head_chunk=cfg.hyper.head_chunk)
    injector = LoRAInjector(student, targets, scale=cfg.hyper.alpha / cfg.hyper.rank)
    model = DistillModel(student, hypernet, injector, cfg)
    if cfg.train.activation_checkpointing:
        distributed.apply_activation_checkpointing(student)
    mesh = distributed.build_mesh(env, distributed.ParallelDims.for_world(env.world_size, cfg.train.shard_size))
    distributed.parallelize(model, student, hypernet, mesh)
    distributed.materialize_student(student, full_state, env)
    model.to(env.device)
    resident = None
    if cfg.train.online_teacher or cfg.train.eval_teacher:
        resident = ResidentTeacher(cfg, student.get_output_embeddings().weight.shape[0], env.device)
        log.info(f"resident teacher {cfg.teacher.model} (frozen, a whole copy per rank)")
    online = resident if cfg.train.online_teacher else None
    eval_teacher = resident if cfg.train.eval_teacher else None
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    n_params = sum(p.numel() for p in hypernet.parameters())
    log.info(f"hypernetwork: {n_params:,} trainable parameters (this rank's shard) over {len(targets)} target linears")

    # ---- resume -------------------------------------------------------------------------------------
    loop = {"step": 0, "phase": 0, "phase_step": 0}
    last = checkpoint.latest_checkpoint(cfg.train.output_dir)
    if last is not None:
        if checkpoint.saved_config(last).get("hash") != config_hash(cfg):
            raise UserError(f"checkpoint {last}: saved with another config; use a new train.output_dir")
        loop = checkpoint.load(last, hypernet, optimizer)
        log.info(f"resumed from {last} at step {loop['step']}")

    heldout_batches, counted = eval_batches(heldout_idx, cfg.train.batch_size, env)
    eval_seq = max(p.seq_len for p in cfg.train.phases)
    eval_loader = make_loader(reader, heldout_batches, eval_seq, pad_id, 0, pin)
    first_eval = evaluate(model, eval_loader, counted, env, eval_teacher) if heldout_idx else {}
    if first_eval:
        log.scalars("eval", first_eval, loop["step"])
    result = {"kl_before": first_eval.get("kl", float("nan"))}
    if eval_teacher is not None:
        result["kl_full_before"] = first_eval.get("kl_full", float("nan"))

    # ---- the loop: phases -> optimizer steps -> micro-batches ----------------------------------------
    step = loop["step"]
    model.train()
    for p in range(loop["phase"], len(cfg.train.phases)):
        phase = cfg.train.phases[p]
        skip = loop["phase_step"] if p == loop["phase"] else 0
        micro = plan.batches[p][skip * cfg.train.grad_accum :]
        loader = iter(make_loader(reader, micro, phase.seq_len, pad_id, cfg.train.num_workers, pin))
        n_steps = len(micro) // cfg.train.grad_accum
        log.info(f"phase {phase.name}: {n_steps} steps at seq_len {phase.seq_len} (from step {skip})")
        for phase_step in range(skip, skip + n_steps):
            if step >= plan.total_steps:
                break
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, plan)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = torch.zeros(4, dtype=torch.float64)
            tokens = 0
            for _ in range(cfg.train.grad_accum):
                batch = next(loader).to(env.device)
                out = model(batch, teacher_rows=online.rows(batch) if online is not None else None)
                rows = max(out.loss.numel(), 1)
                # Mean over this micro-batch's rows; ranks and micro-steps weigh equally.
                (out.loss.sum() / rows / cfg.train.grad_accum).backward()
                injector.clear()
                sums += torch.tensor(
                    [out.loss.sum().item(), out.top1_agree.sum().item(), out.student_tail.sum().item(), rows],
                    dtype=torch.float64,
                )
                tokens += batch.n_tokens
            grad_norm = nn.utils.clip_grad_norm_(hypernet.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            sums = distributed.all_reduce_sum(sums.to(env.device)).cpu()
            tok = distributed.all_reduce_sum(torch.tensor([float(tokens)], device=env.device)).item()
            if step % cfg.train.log_every == 0 or step == plan.total_steps:
                rows_all = max(sums[3].item(), 1.0)
                log.scalars(
                    "train",
                    {
                        "loss": sums[0].item() / rows_all,
                        "top1": sums[1].item() / rows_all,
                        "tail": sums[2].item() / rows_all,
                        "lr": lr,
                        "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                        "tokens_per_s": tok / (time.perf_counter() - t0),
                    },
                    step,
                    total=plan.total_steps,
                )
            if heldout_idx and step % cfg.train.eval_every == 0 and step < plan.total_steps:
                log.scalars("eval", evaluate(model, eval_loader, counted, env, eval_teacher), step)
            if step % cfg.train.checkpoint_every == 0 or step == plan.total_steps:
                where = checkpoint.step_dir(cfg.train.output_dir, step)
                done = {"step": step, "phase": p, "phase_step": phase_step + 1}
                meta = {"hash": config_hash(cfg), "config": to_dict(cfg), "student": resolve_model(cfg.student.model)}
                checkpoint.save(where, hypernet, optimizer, done, meta, env.is_main, distributed.barrier)
                if env.is_main:
                    checkpoint.prune(cfg.train.output_dir)
        if step >= plan.total_steps:
            break

    final = evaluate(model, eval_loader, counted, env, eval_teacher) if heldout_idx else {}
    if final:
        log.scalars("eval", final, step)
        result["kl_after"] = final["kl"]
        if eval_teacher is not None:
            result.update(kl_full_after=final["kl_full"], top1_full_after=final["top1_full"])
        log.info(f"held-out KL to the teacher: {result['kl_before']:.4f} at step 0 -> {final['kl']:.4f} at step {step}")
    result["steps"] = step
    log.close()
    return result


def main(config_path: str | None, overrides: Sequence[str] = ()) -> int:
    """One stage-2 process under torchrun (`hyperdistill train-worker`, which train-student launches): the
    config loaded as every command loads it; a UserError is printed once, by rank 0, and returns 2."""
    env = distributed.init_distributed()
    try:
        cfg = load_config(config_path, overrides)
        train(cfg, env)
        return 0
    except UserError as e:
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    finally:
        distributed.cleanup()

