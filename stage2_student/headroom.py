"""Headroom: how far the frozen base student is from the teacher, per task, before any training is spent.

    hyperdistill headroom --config C [--samples 300] [--split all|heldout|train] [--group-by instance|repo|sample]

Reads a seeded sample of the cache, runs the base student (no LoRA: what stage 2 starts from, B = 0) over
each cached sample in one process, and measures at the cached rows exactly what stage 2's held-out
evaluation measures: the forward KL over the teacher's top-K plus the tail bucket (`losses.topk_distill_loss`,
kind forward_tail, at train.temperature, cut to the longest phase's seq_len) and the top-1 agreement of the
student's full-vocabulary argmax with the teacher's rank-0 id. Means are over rows (tokens), as in stage 2.

Tasks: a sample's task is its instance id from the manifest (prepare-data's output, which must be the one
the cache was built from), its repository (SWE-bench instance ids read `owner__repo-NUMBER`), or the
sample itself. A task "matches" the teacher when its KL is at most `match_kl` nats per row: distillation
has nothing left to teach it (the published Qwen3-Coder-Next is reported above its 480B teacher on
SWE-bench Verified, so on the real run this must be measured, not assumed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.config import RunConfig
from common.errors import UserError
from common.trajectories import repository_of

SPLITS = ("all", "heldout", "train")
GROUPINGS = ("instance", "repo", "sample")
DEFAULT_SAMPLES = 300
DEFAULT_MATCH_KL = 0.05
"""nats per row: below this the base student already matches the teacher on that task."""


def repo_of(instance_id: str) -> str:
    """'pallid__textkit-112' -> 'pallid/textkit' (SWE-bench's naming); other ids are their own repo."""
    return repository_of(instance_id) or instance_id


@dataclass
class TaskHeadroom:
    task: str
    samples: int = 0
    rows: int = 0
    kl_sum: float = 0.0
    top1_sum: float = 0.0

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.rows, 1)

    @property
    def top1(self) -> float:
        return self.top1_sum / max(self.rows, 1)

    def add(self, rows: int, kl_sum: float, top1_sum: float) -> None:
        self.samples += 1
        self.rows += rows
        self.kl_sum += kl_sum
        self.top1_sum += top1_sum

    def as_dict(self) -> dict:
        return {"task": self.task, "samples": self.samples, "rows": self.rows, "kl": self.kl, "top1": self.top1}


@dataclass
class HeadroomReport:
    cache: str
    student: str
    group_by: str
    split: str
    seq_len: int
    temperature: float
    match_kl: float
    samples: int
    overall: TaskHeadroom
    tasks: list[TaskHeadroom]
    per_sample: list[dict] = field(default_factory=list)
    """sample id, task, rows, kl (row mean) and top1 (row mean) of every sample read."""
    sampled_rows: bool = False

    @property
    def matched(self) -> list[TaskHeadroom]:
        return [t for t in self.tasks if t.rows and t.kl <= self.match_kl]

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("overall", "tasks")}
        return {
            **d,
            "overall": self.overall.as_dict(),
            "tasks": [t.as_dict() for t in self.tasks],
            "matched": [t.task for t in self.matched],
        }

    def format(self) -> str:
        width = max([len("task"), len("overall"), *(len(t.task) for t in self.tasks)])
        head = f"{'task':<{width}}  {'samples':>7}  {'rows':>7}  {'KL (nats/row)':>13}  {'top-1':>6}"
        lines = [
            f"headroom of {self.student} against cache {self.cache}: {self.samples} samples ({self.split}), "
            f"seq_len {self.seq_len}, T={self.temperature:g}; forward KL over the teacher's top-K + tail, row means",
            head,
            "-" * len(head),
        ]
        for t in [*self.tasks, self.overall]:
            if t is self.overall:
                lines.append("-" * len(head))
            lines.append(f"{t.task:<{width}}  {t.samples:>7}  {t.rows:>7}  {t.kl:>13.4f}  {t.top1:>6.3f}")
        matched = self.matched
        names = ", ".join(t.task for t in matched) if matched else "none"
        lines.append(
            f"tasks where the student already matches the teacher (KL <= {self.match_kl:g}): "
            f"{len(matched)} of {len(self.tasks)}: {names}"
        )
        if self.sampled_rows:
            lines.append("note: sampled rows: the KL is to the empirical draw distribution, which overstates it")
        return "\n".join(lines)


def task_keys(cfg: RunConfig, sample_ids: list[str], group_by: str) -> dict[str, str]:
    """sample id -> task name. instance and repo read the manifest (`measure` has checked that it is the
    cache's own: the held-out split comes from it too)."""
    if group_by == "sample":
        return {s: s for s in sample_ids}
    from common.manifest import load_manifest

    path = Path(cfg.manifest)
    instance = {row["id"]: row["instance_id"] for row in load_manifest(path)}
    missing = [s for s in sample_ids if s not in instance]
    if missing:
        raise UserError(f"manifest {path}: no entry for cached sample {missing[0]!r} ({len(missing)} missing)")
    return {s: instance[s] if group_by == "instance" else repo_of(instance[s]) for s in sample_ids}


def choose_samples(n_total: int, heldout: list[int], train: list[int], split: str, samples: int, seed: int) -> list[int]:
    """A seeded subset of `samples` cache indices from the split (all of it when smaller), in cache order."""
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    pool = {"all": list(range(n_total)), "heldout": heldout, "train": train}[split]
    if not pool:
        raise UserError(f"--split {split}: the cache holds no {split} samples")
    if samples >= len(pool):
        return list(pool)
    pick = np.random.default_rng(seed).choice(len(pool), size=samples, replace=False)
    return sorted(pool[i] for i in pick)


@torch.no_grad()
def measure(
    cfg: RunConfig,
    samples: int = DEFAULT_SAMPLES,
    split: str = "all",
    group_by: str = "instance",
    match_kl: float = DEFAULT_MATCH_KL,
    seed: int = 0,
) -> HeadroomReport:
    """The headroom report for `cfg`'s cache and student (one process, CPU unless a GPU is there)."""
    from cache_schema import CacheReader
    from common.models import load_causal_lm, load_tokenizer
    from stage2_student.checks import check_compatible
    from stage2_student.data import CacheSamples, collate, manifest_split
    from stage2_student.losses import topk_distill_loss

    if group_by not in GROUPINGS:
        raise UserError(f"--group-by {group_by!r}: expected one of {', '.join(GROUPINGS)}")
    if samples < 1:
        raise UserError(f"--samples {samples}: must be >= 1")
    reader = CacheReader(cfg.cache.path)
    if len(reader) == 0:
        raise UserError(f"cache {cfg.cache.path}: no complete part to read (run teacher-cache first)")
    s = cfg.student
    tokenizer = load_tokenizer(s.model, s.revision, s.trust_remote_code)
    check_compatible(reader, tokenizer, s.model)
    train_idx, heldout_idx = manifest_split(reader, cfg.manifest)
    chosen = choose_samples(len(reader), heldout_idx, train_idx, split, samples, seed)
    ids = reader.sample_ids
    keys = task_keys(cfg, [ids[i] for i in chosen], group_by)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = load_causal_lm(s.model, s.dtype, s.revision, s.trust_remote_code, device=str(device))
    student.requires_grad_(False).eval()
    seq_len = max(p.seq_len for p in cfg.train.phases)  # as stage 2's held-out evaluation
    dataset = CacheSamples(reader, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    tasks: dict[str, TaskHeadroom] = {}
    overall = TaskHeadroom("overall")
    per_sample = []
    for i in tqdm(chosen, desc="headroom", unit="sample"):
        batch = collate([dataset[i]], pad_id).to(device)
        rows = batch.row_sample.numel()
        if rows:
            hidden = student.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
            out = topk_distill_loss(
                hidden[batch.row_sample, batch.row_position], student.lm_head.weight, batch.topk_ids,
                batch.topk_logprobs, kind="forward_tail", temperature=cfg.train.temperature, chunk=cfg.train.loss_chunk,
            )  # fmt: skip
            kl_sum, top1_sum = out.loss.double().sum().item(), out.top1_agree.double().sum().item()
        else:  # a sample with no row inside seq_len: counted, contributes nothing
            kl_sum = top1_sum = 0.0
        task = keys[ids[i]]
        tasks.setdefault(task, TaskHeadroom(task)).add(rows, kl_sum, top1_sum)
        overall.add(rows, kl_sum, top1_sum)
        per_sample.append({"id": ids[i], "task": task, "rows": rows, "kl": kl_sum / max(rows, 1),
                           "top1": top1_sum / max(rows, 1)})  # fmt: skip
    ordered = sorted(tasks.values(), key=lambda t: (-t.kl, t.task))  # most to distil first
    return HeadroomReport(
        cache=str(cfg.cache.path), student=s.model, group_by=group_by, split=split, seq_len=seq_len,
        temperature=cfg.train.temperature, match_kl=match_kl, samples=len(chosen), overall=overall, tasks=ordered,
        per_sample=per_sample, sampled_rows=getattr(reader.meta, "sampled", None) is not None,
    )  # fmt: skip
