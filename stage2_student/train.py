"""Stage 2: train the hypernetwork against the teacher cache; the student stays frozen.

Run under torchrun (`hyperdistill train-student --nproc N` launches it):
    torchrun --nproc_per_node 8 -m hyperdistill.cli train-worker --config configs/qwen3_coder.yaml

Per step: prompt -> hypernetwork -> per-sample LoRA (A, B) for every target linear -> frozen student
forward with the LoRA hooks -> hidden states at the cached rows -> chunked lm_head + logsumexp + gather
-> top-K KL to the teacher -> backward into the hypernetwork only. With hyper.mode=static the same, with one
trainable LoRA for every sample in place of the hypernetwork (model.py).

`Trainer` has torchtitan's shape: set-up in the constructor (output folder and its lease, data, model,
optimizer, resume), `train` runs the loop of `train_step`s with `evaluate` and `save` between them, `close`
releases what set-up took; `main()` always cleans up, on error too.

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

import math
import os
import sys
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from cache_schema import CacheReader
from common.config import RunConfig, config_hash, load_config, save_resolved, to_dict
from common.errors import UserError
from common.models import load_causal_lm, load_tokenizer, resolve_model
from stage2_student import checkpoint, distributed
from stage2_student.checks import check_cache, check_output_dir, same_config
from stage2_student.data import Plan, calibration_prompts, eval_batches, make_loader, manifest_split, plan_phases
from stage2_student.kernels import describe_student_kernels
from stage2_student.launch import OWNER_ENV, new_owner, output_lease
from stage2_student.losses import EVAL_KIND, FULL_VOCAB, TeacherRows
from stage2_student.metrics import MetricsLogger, Sums
from stage2_student.model import build_distill_model


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


def lr_at(step: int, cfg: RunConfig, plan: Plan) -> float:
    """Linear warmup, then cosine to min_lr_ratio over all phases; a phase's `lr` rescales its peak."""
    t = cfg.train
    phase = max(i for i, s in enumerate(plan.starts) if s <= step) if plan.starts else 0
    peak = t.phases[phase].lr if t.phases[phase].lr is not None else t.lr
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, plan.total_steps - t.warmup_steps)
    return peak * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


TRAIN_SUMS = ("loss", "top1", "tail", "rows", "tokens")
EVAL_SUMS = ("kl", "top1", "tail", "rows")
EVAL_TEACHER_SUMS = ("kl_full", "top1_full")


class Trainer:
    def __init__(self, cfg: RunConfig, env, split=None):
        """`split(sample_ids, train, heldout) -> (train, heldout)`, if given, replaces the manifest's split of
        cache indices (benchmarks/hyper.py trains per-task LoRAs on one task's samples of a shared cache)."""
        self.cfg, self.env, self.split = cfg, env, split
        self.lease = None
        self.log: MetricsLogger | None = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.train.seed)

        # ---- the output folder: leased by rank 0 (one run per folder), checked, the resolved config beside it
        self._claim_output_dir()
        self.log = MetricsLogger(cfg.train.output_dir, enabled=env.is_main)
        if env.is_main:
            save_resolved(cfg, cfg.train.output_dir)

        # ---- data: the cache, split into train / held-out as the manifest says ---------------------------
        self.reader = CacheReader(cfg.cache.path)
        tokenizer = load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
        check_cache(self.reader, cfg, tokenizer)
        train_idx, self.heldout_idx = manifest_split(self.reader, cfg.manifest)
        if self.split is not None:
            train_idx, self.heldout_idx = self.split(self.reader.sample_ids, train_idx, self.heldout_idx)
        self.plan = plan_phases(cfg, train_idx, env.rank, env.world_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pin = env.device.type == "cuda"

        # ---- models: frozen student (bf16), LoRA writer (fp32), LoRA hooks, FSDP2 ------------------------
        # Rank 0 reads the weights; other ranks build it on the meta device (distributed.py's docstring).
        student, full_state = distributed.load_student(cfg.student, env)
        self.log.info(describe_student_kernels(student.config, cuda=env.device.type == "cuda"))
        self.model = build_distill_model(cfg, student)
        self._calibrate(train_idx)
        if cfg.train.activation_checkpointing:
            distributed.apply_activation_checkpointing(student)
        mesh = distributed.build_mesh(env, distributed.ParallelDims.for_world(env.world_size, cfg.train.shard_size))
        distributed.parallelize(self.model, student, self.model.hypernet, mesh)
        distributed.materialize_student(student, full_state, env)
        self.model.to(env.device)
        distributed.broadcast_buffers(self.model.hypernet)  # rank 0's calibration (the rest are equal already)
        resident = None
        if cfg.train.online_teacher or cfg.train.eval_teacher:
            resident = ResidentTeacher(cfg, student.get_output_embeddings().weight.shape[0], env.device)
            self.log.info(f"resident teacher {cfg.teacher.model} (frozen, a whole copy per rank)")
        self.online = resident if cfg.train.online_teacher else None
        self.eval_teacher = resident if cfg.train.eval_teacher else None
        self.params = [p for p in self.model.hypernet.parameters() if p.requires_grad]  # a frozen encoder is not
        self.optimizer = torch.optim.AdamW(self.model.hypernet.optimizer_groups(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay)
        n_params = sum(p.numel() for p in self.params)
        what = "static LoRA" if cfg.hyper.mode == "static" else "hypernetwork"
        self.log.info(f"{what}: {n_params:,} trainable parameters (this rank's shard) over "
                      f"{len(self.model.targets)} target linears")  # fmt: skip

        # ---- resume, held-out batches ---------------------------------------------------------------------
        self.loop = {"step": 0, "phase": 0, "phase_step": 0}
        self.resume()
        heldout_batches, self.counted = eval_batches(self.heldout_idx, cfg.train.batch_size, env.rank, env.world_size)
        eval_seq = max(p.seq_len for p in cfg.train.phases)
        self.eval_loader = make_loader(self.reader, heldout_batches, eval_seq, self.pad_id, 0, self.pin)

    def _calibrate(self, train_idx: list[int]) -> None:
        """Before parallelize, on rank 0 (which holds the real student): standardise the hypernetwork's task vector
        over hyper.calibration_prompts training prompts (HyperNetwork.calibrate); `_setup` then broadcasts it. A
        resumed run overwrites it with its checkpoint's."""
        count = self.cfg.hyper.calibration_prompts
        if not (count and len(train_idx) >= 2 and self.env.is_main):
            return
        prompts = calibration_prompts(self.reader, train_idx, count, self.cfg.train.batch_size, self.pad_id)
        report = self.model.calibrate(prompts)
        if report is not None:
            self.log.info(f"task vector standardised over {report['prompts']} training prompts "
                          f"({report['varying_share']:.0%} of it differed between them)")  # fmt: skip

    def _claim_output_dir(self) -> None:
        """Rank 0 takes train.output_dir's lease (continuing a `train-student` launcher's claim when it made
        one) and checks its checkpoints; a refusal reaches every rank, so all stop with the same one line."""
        error = None
        if self.env.is_main:
            try:
                lease = output_lease(self.cfg.train.output_dir, os.environ.get(OWNER_ENV) or new_owner())
                lease.acquire()
                self.lease = lease
                check_output_dir(self.cfg)
            except UserError as e:
                error = str(e)
        error = distributed.broadcast_from_main(error)
        if error is not None:
            raise UserError(error)

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the newest complete checkpoint in train.output_dir, if there is one."""
        last = checkpoint.latest_checkpoint(self.cfg.train.output_dir)
        if last is None:
            return
        if not same_config(checkpoint.saved_config(last), self.cfg):
            raise UserError(f"checkpoint {last}: saved with another config; use a new train.output_dir")
        self.loop = checkpoint.load(last, self.model.hypernet, self.optimizer)
        self.log.info(f"resumed from {last} at step {self.loop['step']}")

    def save(self, step: int, phase: int, phase_step: int) -> None:
        """A DCP checkpoint after `step` (the loop continues at `phase_step` of `phase`), keeping the newest two."""
        cfg = self.cfg
        where = checkpoint.step_dir(cfg.train.output_dir, step)
        done = {"step": step, "phase": phase, "phase_step": phase_step}
        meta = {"hash": config_hash(cfg), "config": to_dict(cfg), "student": resolve_model(cfg.student.model)}
        checkpoint.save(where, self.model.hypernet, self.optimizer, done, meta, self.env.is_main, distributed.barrier)
        if self.env.is_main:
            checkpoint.prune(cfg.train.output_dir)

    # ---- one optimizer step, one evaluation ------------------------------------------------------------

    def train_step(self, loader: Iterator) -> tuple[dict[str, float], float]:
        """grad_accum micro-batches from `loader`, one clipped AdamW step; returns the step's sums over every
        rank and the gradient norm."""
        cfg, model = self.cfg, self.model
        sums = Sums(*TRAIN_SUMS)
        for _ in range(cfg.train.grad_accum):
            batch = next(loader).to(self.env.device)
            teacher_rows = self.online.rows(batch) if self.online is not None else None
            with model.lora_scope():  # the LoRA the forward writes lives through backward, then is cleared
                out = model(batch, teacher_rows=teacher_rows)
                rows = max(out.loss.numel(), 1)
                # Mean over this micro-batch's rows; ranks and micro-steps weigh equally.
                (out.loss.sum() / rows / cfg.train.grad_accum).backward()
            sums.add(loss=out.loss.sum().item(), top1=out.top1_agree.sum().item(),
                     tail=out.student_tail.sum().item(), rows=rows, tokens=batch.n_tokens)  # fmt: skip
        grad_norm = nn.utils.clip_grad_norm_(self.params, cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        return sums.reduced(distributed.all_reduce_sum, self.env.device), grad_norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out forward KL (tail bucket) to the cache, top-1 agreement and tail mass, summed over rows on all
        ranks; with a resident teacher also the full-vocabulary KL to it ("kl_full") and top-1 agreement with its
        argmax ("top1_full"). Both KLs at train.temperature, like the training loss."""
        model, teacher = self.model, self.eval_teacher
        model.eval()
        sums = Sums(*EVAL_SUMS, *(EVAL_TEACHER_SUMS if teacher is not None else ()))
        for batch, count in zip(self.eval_loader, self.counted):
            batch = batch.to(self.env.device)
            with model.lora_scope():
                out = model(batch, kind=EVAL_KIND)
            full = None
            if teacher is not None:
                # A second student forward: the lm_heads dominate its cost, and each loss needs its own anyway.
                with model.lora_scope():
                    full = model(batch, kind=FULL_VOCAB, teacher_rows=teacher.rows(batch))
            if not count:
                continue
            sums.add(kl=out.loss.sum().item(), top1=out.top1_agree.sum().item(), tail=out.student_tail.sum().item(),
                     rows=out.loss.numel())  # fmt: skip
            if full is not None:
                sums.add(kl_full=full.loss.sum().item(), top1_full=full.top1_agree.sum().item())
        total = sums.reduced(distributed.all_reduce_sum, self.env.device)
        model.train()
        rows = max(total["rows"], 1.0)
        result = {"kl": total["kl"] / rows, "top1": total["top1"] / rows, "tail": total["tail"] / rows, "rows": rows}
        if teacher is not None:
            result.update(kl_full=total["kl_full"] / rows, top1_full=total["top1_full"] / rows)
        return result

    # ---- the loop: phases -> optimizer steps -> micro-batches ------------------------------------------------

    def train(self) -> dict[str, float]:
        cfg, plan, log, loop = self.cfg, self.plan, self.log, self.loop
        heldout = bool(self.heldout_idx)
        first = self.evaluate() if heldout else {}
        if first:
            log.scalars("eval", first, loop["step"])
        result = {"kl_before": first.get("kl", float("nan"))}
        if self.eval_teacher is not None:
            result["kl_full_before"] = first.get("kl_full", float("nan"))

        step = loop["step"]
        self.model.train()
        for p in range(loop["phase"], len(cfg.train.phases)):
            phase = cfg.train.phases[p]
            skip = loop["phase_step"] if p == loop["phase"] else 0
            micro = plan.batches[p][skip * cfg.train.grad_accum :]
            loader = iter(make_loader(self.reader, micro, phase.seq_len, self.pad_id, cfg.train.num_workers, self.pin))
            n_steps = len(micro) // cfg.train.grad_accum
            log.info(f"phase {phase.name}: {n_steps} steps at seq_len {phase.seq_len} (from step {skip})")
            for phase_step in range(skip, skip + n_steps):
                if step >= plan.total_steps:
                    break
                t0 = time.perf_counter()
                lr = lr_at(step, cfg, plan)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]  # hypernet.optimizer_groups says why
                sums, grad_norm = self.train_step(loader)
                step += 1
                if self.lease is not None:
                    self.lease.renew_if_due()
                if step % cfg.train.log_every == 0 or step == plan.total_steps:
                    rows = max(sums["rows"], 1.0)
                    metrics = {"loss": sums["loss"] / rows, "top1": sums["top1"] / rows, "tail": sums["tail"] / rows,
                               "lr": lr, "grad_norm": grad_norm, "tokens_per_s": sums["tokens"] / (time.perf_counter() - t0)}  # fmt: skip
                    log.scalars("train", metrics, step, total=plan.total_steps)
                if heldout and step % cfg.train.eval_every == 0 and step < plan.total_steps:
                    log.scalars("eval", self.evaluate(), step)
                if step % cfg.train.checkpoint_every == 0 or step == plan.total_steps:
                    self.save(step, p, phase_step + 1)
            if step >= plan.total_steps:
                break

        final = self.evaluate() if heldout else {}
        if final:
            log.scalars("eval", final, step)
            result["kl_after"] = final["kl"]
            if self.eval_teacher is not None:
                result.update(kl_full_after=final["kl_full"], top1_full_after=final["top1_full"])
            log.info(f"held-out KL to the teacher: {result['kl_before']:.4f} at step 0 -> {final['kl']:.4f} at step {step}")
        result["steps"] = step
        return result

    def close(self) -> None:
        """Close the logs and release the output folder's lease (safe to call twice, and after a failed set-up)."""
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train(cfg: RunConfig, env) -> dict[str, float]:
    """One whole run in this process's rank: set up, train, close. Returns the held-out KLs and steps."""
    with Trainer(cfg, env) as trainer:
        return trainer.train()


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
