"""Does the hypernetwork earn its keep? Base student, static LoRA, hypernetwork and per-task oracle LoRAs on the
task-family testbed (common/testbed.py), at equal optimizer steps.

    python -m benchmarks.hyper [--quick] [--steps N] [--seeds 0 1 2] [--oracle-seen N] [--oracle-unseen N]
                               [--lr-static LR] [--lr-hypernetwork LR] [--threads N] [--workdir runs/bench-hyper]
                               [--json out.json] [--table out.json]

1. Data, built once under the workdir and reused: the testbed teacher (common.tiny_models, on first use), then
   prepare-data + stage 1 with the reference `hf` backend for two sources of configs/testbed.yaml:
   - `seen`: the 24 seen tasks' stage-2 trajectories; data.heldout_fraction 0.25 holds out (by a hash of the id)
     unseen trajectories of seen tasks: held-out set "seen tasks";
   - `unseen`: the 6 tasks no stage-2 training run sees; data.heldout_fraction 0.5: the held-out half is the set
     "unseen tasks", and the other half is what each unseen task's oracle trains on.
2. Training runs, one process (no FSDP) each, all with the same budget: --steps optimizer steps of batch
   train.batch_size, configs/testbed.yaml's lr, warm-up and cosine schedule (cut to --steps), the same loss:
   - static: `hyper.mode=static` on every training trajectory of the seen tasks, one run per seed;
   - hypernetwork: the same data, one run per seed;
   - oracle: per task, a static LoRA trained only on that task's own training trajectories (seed 0), evaluated
     on that task's held-out trajectories only, at step 0 and every `oracle_eval_every` (25) steps; its figures
     are those of its best evaluation (`oracle_figures`: with 4-6 trajectories it can overfit within the
     budget). A subset of the tasks (--oracle-seen, --oracle-unseen; the first ones in the testbed's order with
     at least 2 held-out and 2 training trajectories): one run per task costs as much as a static run.
   The base student is the static run's model before its first step (B = 0: exactly the frozen student).
3. The yardstick of benchmarks/teach.py: held-out forward KL(teacher || student) over the full vocabulary at
   every cached row (`distill_loss` of kind FULL_VOCAB, what Trainer.evaluate reports as kl_full with
   train.eval_teacher), per task, with the teacher's rows computed once for all runs; and, from the same student
   forward, at the rows that decide the task's conventions (first tool call, source folder, test command:
   common.testbed.convention_tokens), where the task-dependence lives: the same KL there alone, and the
   teacher-forced top-1 accuracy. For the hypernetwork also how much its LoRA differs between tasks
   (`delta_spread`).

The student is configs/testbed.yaml's `tiny-student-testbed`: it writes the testbed's format and is at chance on
the conventions (common.testbed), so the KL left to distil sits mostly at the convention rows. The hypernetwork
reads configs/testbed.yaml's `data.prompt: repository` ("Repository: ORG/KIND-WORD"): the two prompts of a task
in `delta_spread` are then the same, and its within-task spread is 0.

Prints a markdown table (per method: KL per held-out set, the share of the oracle's KL reduction
(base - method) / (base - oracle) on the oracle tasks of each set, the same two at the convention rows, convention
accuracy; mean (min–max) over seeds) and writes every raw figure as JSON (--json, default WORKDIR/hyper.json),
after every training run. Runs go: the first seed of static and hypernetwork, the oracles, the other seeds.
Training runs are always redone.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.output import write_json

REPO = Path(__file__).resolve().parent.parent
TESTBED_CONFIG = REPO / "configs" / "testbed.yaml"
SETS = ("seen", "unseen")
"""The held-out sets: unseen trajectories of seen tasks, and unseen tasks; each is also a cache of its own."""
HELDOUT_FRACTION = {"seen": 0.25, "unseen": 0.5}
CONVENTIONS = ("tool", "source_dir", "test_command")


@dataclass(frozen=True)
class Settings:
    steps: int
    """Optimizer steps of every training run."""
    batch_size: int
    """train.batch_size of every run (trajectories per step; also the held-out batches)."""
    seeds: tuple[int, ...]
    """train.seed of the static and hypernetwork runs (initialisation and data order)."""
    oracle_seen: int
    """Seen tasks that get an oracle LoRA (the first eligible ones in the testbed's task order)."""
    oracle_unseen: int
    """Unseen tasks that get an oracle LoRA."""
    threads: int
    """torch threads."""
    oracle_eval_every: int = 25
    """Steps between an oracle's evaluations on its own held-out trajectories (step 0 included); its figures are
    those of its best evaluation."""
    lr: tuple[tuple[str, float], ...] = ()
    """(hyper.mode, train.lr) pairs: a mode's own peak lr (the oracles are static LoRAs: static's); a mode not
    named trains at configs/testbed.yaml's lr."""

    def lr_of(self, mode: str) -> float | None:
        return dict(self.lr).get(mode)


# 9 runs of 200 steps (3 static, 3 hypernetwork, 3 oracles): 6.5-9 min each with two benches side by side on 2
# cores (--threads 1), an oracle ~19 min beside another job (it evaluates every 25 steps), so about 1.2 hours; and
# ~15 minutes more from a fresh clone, where the two testbed models and both caches are built first (BENCHMARKS.md).
FULL = Settings(steps=200, batch_size=2, seeds=(0, 1, 2), oracle_seen=2, oracle_unseen=1, threads=2)
QUICK = Settings(steps=2, batch_size=2, seeds=(0,), oracle_seen=1, oracle_unseen=1, threads=2, oracle_eval_every=1)


# ---- data ----------------------------------------------------------------------------------------------------


def set_overrides(name: str, workdir: Path) -> list[str]:
    """configs/testbed.yaml pointed at one source's manifest and cache under the workdir."""
    return [
        f"data.source=testbed:{name}",
        f"data.heldout_fraction={HELDOUT_FRACTION[name]}",
        f"manifest={workdir / name / 'manifest.jsonl'}",
        f"cache.path={workdir / name / 'cache.zarr'}",
        "teacher.backend=hf",
    ]


def build_data(workdir: Path) -> None:
    """prepare-data + stage 1 for both sources, unless a complete cache is there (stage 1 skips complete parts)."""
    from common.config import load_config
    from common.manifest import prepare_data
    from common.models import load_tokenizer
    from stage1_teacher.run import main as stage1_main

    for name in SETS:
        cfg = load_config(TESTBED_CONFIG, set_overrides(name, workdir))
        if not Path(cfg.manifest).exists():
            prepare_data(cfg, load_tokenizer(cfg.student.model))
        stage1_main(cfg)


@dataclass
class HeldoutSet:
    """One source's cache, its manifest split by task, and the convention tokens of its samples."""

    reader: object
    train: dict[str, list[int]]
    """task repo -> cache indices of its training trajectories"""
    heldout: dict[str, list[int]]
    """task repo -> cache indices of its held-out trajectories"""
    conventions: dict[int, dict[str, list[int]]]
    """cache index -> {convention: token indices t it decides}"""


def load_set(name: str, workdir: Path, tokenizer) -> HeldoutSet:
    from cache_schema import CacheReader
    from common import testbed
    from stage2_student.data import manifest_split

    cfg_manifest, cache = workdir / name / "manifest.jsonl", workdir / name / "cache.zarr"
    reader = CacheReader(str(cache))
    train_idx, heldout_idx = manifest_split(reader, str(cfg_manifest))
    rows = {r["trajectory_id"]: r for r in testbed.generate(name)}
    train, heldout, conventions = defaultdict(list), defaultdict(list), {}
    for idx, target in ((train_idx, train), (heldout_idx, heldout)):
        for i in idx:
            row = rows[reader.sample_ids[i]]
            target[row["repo"]].append(i)
            ids, wanted = testbed.convention_tokens(tokenizer, row)
            if list(reader[i].input_ids) != ids:  # the positions are those of the rendered text: they must agree
                raise RuntimeError(f"{reader.sample_ids[i]}: cached input_ids differ from the testbed's render")
            conventions[i] = wanted
    return HeldoutSet(reader, dict(train), dict(heldout), conventions)


def oracle_tasks(sets: dict[str, HeldoutSet], s: Settings) -> dict[str, list[str]]:
    """Per set, the tasks that get an oracle: the first in the testbed's order with >= 2 training and >= 2 held-out
    trajectories (so the oracle has something to learn from and is measured on more than one trajectory)."""
    from common import testbed

    out = {}
    for name, count in (("seen", s.oracle_seen), ("unseen", s.oracle_unseen)):
        hs = sets[name]
        eligible = [t.repo for t in testbed.TASKS
                    if len(hs.train.get(t.repo, ())) >= 2 and len(hs.heldout.get(t.repo, ())) >= 2]  # fmt: skip
        out[name] = eligible[:count]
    return out


# ---- evaluation ------------------------------------------------------------------------------------------------


@dataclass
class EvalBatch:
    """One held-out batch of one task, with what the teacher says about it (computed once for every run)."""

    batch: object
    teacher_rows: object
    """losses.TeacherRows: the teacher's last hidden states at the batch's rows and its lm_head"""
    wanted: list[dict[str, list[int]]]
    """per sample, {convention: token indices t that decide it}"""
    convention_rows: dict[str, torch.Tensor]
    """{convention: indices into the batch's rows of the rows that predict those tokens (row position t - 1)}"""


def convention_rows(batch, wanted: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """{convention: row indices}: the cached rows (row r predicts token row_position[r] + 1 of sample
    row_sample[r]) at which the task's conventions are decided."""
    where = {(int(i), int(t)): r for r, (i, t) in enumerate(zip(batch.row_sample, batch.row_position))}
    out = {}
    for key in CONVENTIONS:
        out[key] = torch.tensor([where[(i, t - 1)] for i, w in enumerate(wanted) for t in w.get(key, ())
                                 if (i, t - 1) in where], dtype=torch.long)  # fmt: skip
    return out


def _hits(head, hidden: torch.Tensor, input_ids: torch.Tensor, wanted: list[dict[str, list[int]]]) -> dict:
    """{convention: [hits, tokens]}: teacher-forced argmax at t - 1 == the token at t."""
    hits = {k: [0, 0] for k in CONVENTIONS}
    for i, w in enumerate(wanted):
        for key, tokens in w.items():
            at = torch.tensor(tokens)
            hits[key][0] += int((head(hidden[i, at - 1]).argmax(-1) == input_ids[i, at]).sum())
            hits[key][1] += len(tokens)
    return hits


def _add(into: dict, hits: dict) -> None:
    for key, (h, n) in hits.items():
        into[key][0] += h
        into[key][1] += n


@torch.no_grad()
def prepare_eval(teacher, hs: HeldoutSet, tasks: list[str], batch_size: int, seq_len: int, pad_id: int):
    """Per task, its held-out batches with the teacher's rows (one teacher forward per batch for the whole
    benchmark), and the teacher's own convention hits."""
    from stage2_student.data import eval_batches, make_loader
    from stage2_student.losses import TeacherRows

    out, teacher_hits = {}, {}
    for repo in tasks:
        batches, _ = eval_batches(hs.heldout[repo], batch_size, 0, 1)
        items, hits = [], {k: [0, 0] for k in CONVENTIONS}
        for idx, batch in zip(batches, make_loader(hs.reader, batches, seq_len, pad_id, 0, False)):
            hidden = teacher.decoder(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # [N, T, Ht]
            wanted = [hs.conventions[i] for i in idx]
            rows = TeacherRows(hidden[batch.row_sample, batch.row_position], teacher.lm_head.weight)
            items.append(EvalBatch(batch, rows, wanted, convention_rows(batch, wanted)))
            _add(hits, _hits(teacher.lm_head, hidden, batch.input_ids, wanted))
        out[repo], teacher_hits[repo] = items, hits
    return out, teacher_hits


@torch.no_grad()
def evaluate_tasks(model, prepared: dict[str, list[EvalBatch]]) -> dict[str, dict]:
    """Per task: the held-out full-vocabulary KL(teacher || student) and top-1 agreement with the teacher's argmax
    (`distill_loss` of kind FULL_VOCAB, what Trainer.evaluate reports as kl_full / top1_full with
    train.eval_teacher, the yardstick of benchmarks/teach.py), and the convention hits; one student forward per
    batch serves both (DistillModel.forward's steps, keeping the hidden states)."""
    from stage2_student.losses import FULL_VOCAB, distill_loss

    model.eval()
    out = {}
    for repo, items in prepared.items():
        kl = top1 = rows = 0.0
        hits = {k: [0, 0] for k in CONVENTIONS}
        conv_kl = {k: [0.0, 0] for k in CONVENTIONS}
        for item in items:
            b = item.batch
            with model.lora_scope():
                model.injector.set(model.lora_weights(b.prompt_ids, b.prompt_mask))
                hidden = model.student.model(input_ids=b.input_ids, use_cache=False).last_hidden_state  # [N, T, H]
                full = distill_loss(FULL_VOCAB, hidden[b.row_sample, b.row_position], model.student.lm_head.weight,
                                    teacher=item.teacher_rows, temperature=model.loss.temperature,
                                    chunk=model.loss.chunk)  # fmt: skip
                _add(hits, _hits(model.student.lm_head, hidden, b.input_ids, item.wanted))
            for key, at in item.convention_rows.items():
                conv_kl[key][0] += full.loss[at].sum().item()
                conv_kl[key][1] += len(at)
            kl += full.loss.sum().item()
            top1 += full.top1_agree.sum().item()
            rows += full.loss.numel()
        out[repo] = {"kl_full": kl / max(rows, 1), "top1_full": top1 / max(rows, 1), "rows": rows, "conventions": hits,
                     "convention_kl": conv_kl}  # fmt: skip
    model.train()
    return out


@torch.no_grad()
def delta_spread(model, sets: dict[str, HeldoutSet]) -> dict[str, float]:
    """How much the hypernetwork's LoRA depends on the task: per target, the generated deltas s * B A for two
    prompts of every task (two trajectories' task prompts: the same repository, different issues, when the prompt
    holds the issue);
    between = RMS over tasks of ||mean of the task's deltas - mean over all||, within = RMS over tasks of
    ||delta(prompt 1) - delta(prompt 2)|| / sqrt(2), both relative to ||mean over all||; means over targets."""
    from stage2_student.data import pad_prompts

    prompts = []
    for hs in sets.values():
        for repo, idx in hs.train.items():
            both = (idx + hs.heldout.get(repo, []))[:2]
            if len(both) == 2:
                prompts += [torch.as_tensor(hs.reader[i].prompt_ids, dtype=torch.long) for i in both]
    n = len(prompts) // 2
    ids, mask = pad_prompts(prompts, pad_id=0)
    model.eval()
    lora = model.lora_weights(ids, mask)
    model.train()
    between, within = [], []
    for a, b in lora.values():
        delta = (model.hypernet.lora_scale * b.float() @ a.float()).view(n, 2, -1)  # [tasks, 2 prompts, out * in]
        overall = delta.mean((0, 1)).norm().clamp(min=1e-12)
        between.append(((delta.mean(1) - delta.mean((0, 1))).norm(dim=-1).pow(2).mean().sqrt() / overall).item())
        within.append(((delta[:, 0] - delta[:, 1]).norm(dim=-1).pow(2).mean().sqrt() / 2**0.5 / overall).item())
    return {"tasks": n, "between_tasks": statistics.fmean(between), "within_task": statistics.fmean(within)}


# ---- training runs -------------------------------------------------------------------------------------------


def run_config(s: Settings, workdir: Path, source: str, name: str, mode: str, seed: int, eval_every: int = 1000000):
    from common.config import load_config

    out = workdir / "train" / name
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would be resumed, not retrained
    lr = [] if s.lr_of(mode) is None else [f"train.lr={s.lr_of(mode)}"]
    return load_config(TESTBED_CONFIG, [*lr,
        *set_overrides(source, workdir), f"hyper.mode={mode}", f"train.seed={seed}", f"train.output_dir={out}",
        f"train.max_steps={s.steps}",
        # Enough passes for the smallest training set (an oracle's 2-6 trajectories) to fill --steps; max_steps
        # cuts every run at the same step, and the cosine schedule follows max_steps.
        f"train.phases=[{{name: main, epochs: {max(4, 4 * s.steps)}, seq_len: 1024}}]",
        f"train.batch_size={s.batch_size}", f"train.eval_every={eval_every}", "train.checkpoint_every=1000000",
        "train.log_every=10",
    ])  # fmt: skip


def train_and_evaluate(cfg, only: list[int], evals: dict[str, dict], base: bool = False,
                       spread_sets: dict[str, HeldoutSet] | None = None, track: list[int] | None = None) -> dict:
    """Train on cache indices `only` (every evaluation is ours, on the prepared batches `evals`
    {set: {task: [EvalBatch]}}); with `base`, also evaluate before the first step (B = 0: the base student).
    With `track` (the cache indices of the held-out trajectories `evals` holds), also evaluate `evals` at step 0
    and every train.eval_every steps: `trace` lists those evaluations, the last at the final step."""
    from stage2_student.distributed import DistEnv
    from stage2_student.train import Trainer

    def split(_sample_ids, _train, _heldout):
        return list(only), list(track or [])

    class Tracked(Trainer):
        """The trainer's own held-out evaluation points, measured with the benchmark's yardstick."""

        trace: list[dict]  # set before train()

        def evaluate(self) -> dict[str, float]:
            at = {n: evaluate_tasks(self.model, prepared) for n, prepared in evals.items()}
            self.trace.append(at)
            return {"kl": statistics.fmean(aggregate(per_task)["kl_full"] for per_task in at.values())}

    t0 = time.perf_counter()
    result = {}
    with Tracked(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"), split=split) as trainer:
        trainer.trace = []
        if base:
            result["base"] = {n: evaluate_tasks(trainer.model, prepared) for n, prepared in evals.items()}
        t1 = time.perf_counter()
        trainer.train()
        result["train_s"] = time.perf_counter() - t1
        result["after"] = trainer.trace[-1] if track else {n: evaluate_tasks(trainer.model, prepared)
                                                           for n, prepared in evals.items()}  # fmt: skip
        if track:
            every = cfg.train.eval_every
            result["trace"] = [{"step": min(i * every, cfg.train.max_steps), "after": at}
                               for i, at in enumerate(trainer.trace)]  # fmt: skip
        if spread_sets is not None:
            result["delta_spread"] = delta_spread(trainer.model, spread_sets)
    shutil.rmtree(Path(cfg.train.output_dir) / "checkpoints", ignore_errors=True)  # MBs per run, never read
    result["seconds"] = time.perf_counter() - t0
    return result


def oracle_figures(r: dict, name: str, repo: str) -> dict:
    """An oracle's figures: those of its best evaluation (lowest held-out KL, step 0 included), with that step,
    its last evaluation's KL and the whole trace. With 4-6 training trajectories a per-task LoRA can overfit
    within the budget (one went from 0.19 at step 0 to 0.25 after 200 steps while getting every convention
    token right), and the reference is what a per-task LoRA can reach: the best point, chosen on the held-out
    trajectories themselves, which flatters the oracle and so understates the other methods' shares."""
    trace = [(t["step"], t["after"][name][repo]) for t in r["trace"]]
    step, best = min(trace, key=lambda t: t[1]["kl_full"])
    return {**best, "best_step": step, "last_kl_full": trace[-1][1]["kl_full"],
            "trace": [(st, at["kl_full"]) for st, at in trace], "train_s": r["train_s"], "seconds": r["seconds"]}


def run(s: Settings, workdir: Path, json_path: str) -> dict:
    """Everything above; the raw results go to `json_path` after every training run (a run cut short keeps what it
    finished), complete at the end."""
    from common.models import load_tokenizer, resolve_model
    from common.tiny_models import TESTBED_STUDENT, TESTBED_TEACHER
    from common.tokenizer import PADDED_VOCAB_SIZE
    from stage2_student.train import ResidentTeacher

    torch.set_num_threads(s.threads)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name in (TESTBED_TEACHER, TESTBED_STUDENT):
        resolve_model(name)  # built on first use (minutes), then cached
    build_data(workdir)
    data_s = time.perf_counter() - t0
    tokenizer = load_tokenizer(TESTBED_STUDENT)
    sets = {name: load_set(name, workdir, tokenizer) for name in SETS}
    oracles = oracle_tasks(sets, s)
    cfg = run_config(s, workdir, "seen", "prepare", "static", 0)
    teacher = ResidentTeacher(cfg, PADDED_VOCAB_SIZE, torch.device("cpu"))
    eval_bs, seq_len = cfg.train.batch_size, max(p.seq_len for p in cfg.train.phases)
    prepared, teacher_hits = {}, {}
    for name, hs in sets.items():
        prepared[name], teacher_hits[name] = prepare_eval(teacher, hs, sorted(hs.heldout), eval_bs, seq_len,
                                                          tokenizer.pad_token_id)  # fmt: skip
    del teacher
    seen_train = sorted(i for idx in sets["seen"].train.values() for i in idx)
    runs: dict[str, list[dict]] = {"static": [], "hypernetwork": []}
    oracle: dict[str, dict] = {name: {} for name in SETS}
    base = None
    result = {
        "settings": dataclasses.asdict(s),
        "model_builds": _build_reports(),
        "heldout": {name: {repo: len(idx) for repo, idx in sets[name].heldout.items()} for name in SETS},
        "train_trajectories": {name: {repo: len(idx) for repo, idx in sets[name].train.items()} for name in SETS},
        "oracle_tasks": oracles,
        "runs": runs,
        "oracle": oracle,
        "data_s": data_s,
    }
    def methods(seed: int) -> None:
        nonlocal base
        for mode in ("static", "hypernetwork"):
            cfg = run_config(s, workdir, "seen", f"{mode}-seed{seed}", mode, seed)
            r = train_and_evaluate(cfg, seen_train, prepared, base=base is None,
                                   spread_sets=sets if mode == "hypernetwork" else None)  # fmt: skip
            if base is None:
                base = result["base"] = r.pop("base")
                for name in SETS:
                    for repo, hits in teacher_hits[name].items():
                        base[name][repo]["teacher_conventions"] = hits
            runs[mode].append({"seed": seed, **r})
            write_json(result, json_path)
            print(f"{mode} seed {seed}: KL seen {aggregate(r['after']['seen'])['kl_full']:.4f}, "
                  f"unseen {aggregate(r['after']['unseen'])['kl_full']:.4f} in {r['seconds']:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip

    def oracle_runs() -> None:
        for name in SETS:
            for repo in oracles[name]:
                cfg = run_config(s, workdir, name, f"oracle-{name}-{repo.replace('/', '__')}", "static", 0,
                                 eval_every=s.oracle_eval_every)  # fmt: skip
                r = train_and_evaluate(cfg, sets[name].train[repo], {name: {repo: prepared[name][repo]}},
                                       track=sets[name].heldout[repo])  # fmt: skip
                oracle[name][repo] = oracle_figures(r, name, repo)
                o = oracle[name][repo]
                print(f"oracle {repo}: KL {o['kl_full']:.4f} at step {o['best_step']} ({o['last_kl_full']:.4f} at "
                      f"the last; base {base[name][repo]['kl_full']:.4f})", file=sys.stderr, flush=True)  # fmt: skip
                write_json(result, json_path)

    # First seed, then the oracles, then the other seeds: a run cut short still has a whole table at one seed.
    methods(s.seeds[0])
    oracle_runs()
    for seed in s.seeds[1:]:
        methods(seed)
    result["total_s"] = time.perf_counter() - t0
    write_json(result, json_path)
    return result


def _build_reports() -> dict:
    import json

    from common.models import resolve_model
    from common.tiny_models import REPORT_FILE, TESTBED_STUDENT, TESTBED_TEACHER

    return {name: json.loads((Path(resolve_model(name)) / REPORT_FILE).read_text())
            for name in (TESTBED_TEACHER, TESTBED_STUDENT)}  # fmt: skip


# ---- figures --------------------------------------------------------------------------------------------------


def aggregate(per_task: dict[str, dict], tasks: list[str] | None = None, key: str = "conventions") -> dict:
    """Row-weighted KL and top-1 over `tasks` (default: all), and the convention accuracy over their tokens."""
    tasks = list(per_task) if tasks is None else tasks
    rows = sum(per_task[t]["rows"] for t in tasks)
    hits = sum(per_task[t][key][c][0] for t in tasks for c in CONVENTIONS)
    n = sum(per_task[t][key][c][1] for t in tasks for c in CONVENTIONS)
    out = {
        "kl_full": sum(per_task[t]["kl_full"] * per_task[t]["rows"] for t in tasks) / rows,
        "top1_full": sum(per_task[t]["top1_full"] * per_task[t]["rows"] for t in tasks) / rows,
        "rows": rows,
        "conventions": hits / max(n, 1),
        "convention_tokens": n,
    }
    if all("convention_kl" in per_task[t] for t in tasks):  # not in the teacher's hits, nor in older results
        total = sum(per_task[t]["convention_kl"][c][0] for t in tasks for c in CONVENTIONS)
        count = sum(per_task[t]["convention_kl"][c][1] for t in tasks for c in CONVENTIONS)
        out["kl_conventions"] = total / max(count, 1)
    return out


def summary(r: dict) -> dict:
    """Per method and set: KL over every held-out task, share of the oracle's KL reduction on the oracle tasks,
    convention accuracy; lists over seeds."""
    base, oracle = r["base"], r["oracle"]
    out: dict[str, dict] = {"base": {}, "teacher": {}, "oracle": {}}
    for name in SETS:
        tasks = [t for t in r["oracle_tasks"][name] if t in oracle[name]]  # a bench cut short: the oracles it ran
        b = aggregate(base[name])
        out["base"][name] = {"kl": [b["kl_full"]], "conv": [b["conventions"]], "kl_conv": [b.get("kl_conventions")]}
        out["teacher"][name] = {"conv": [aggregate(base[name], key="teacher_conventions")["conventions"]],
                                "kl": [0.0], "kl_conv": [0.0]}  # fmt: skip
        if tasks:
            base_o, oracle_o = aggregate(base[name], tasks), aggregate(oracle[name], tasks)
            out["oracle"][name] = {"kl_oracle_tasks": [oracle_o["kl_full"]], "share": [1.0], "share_conv": [1.0],
                                   "conv": [oracle_o["conventions"]], "kl_conv": [oracle_o.get("kl_conventions")],
                                   "base_oracle_tasks": base_o["kl_full"]}  # fmt: skip
        for method, runs in r["runs"].items():
            m = out.setdefault(method, {}).setdefault(name, {"kl": [], "conv": [], "kl_conv": [], "share": [],
                                                             "share_conv": [], "kl_oracle_tasks": []})  # fmt: skip
            for run_ in runs:
                after = aggregate(run_["after"][name])
                m["kl"].append(after["kl_full"])
                m["conv"].append(after["conventions"])
                m["kl_conv"].append(after.get("kl_conventions"))
                if tasks:
                    on = aggregate(run_["after"][name], tasks)
                    m["kl_oracle_tasks"].append(on["kl_full"])
                    m["share"].append(_share(base_o, on, oracle_o, "kl_full"))
                    if "kl_conventions" in on:
                        m["share_conv"].append(_share(base_o, on, oracle_o, "kl_conventions"))
    return out


def merge(results: list[dict]) -> dict:
    """Several benches' JSON (e.g. two run side by side with --threads 1, one per seed or the oracles) as one: their
    runs by seed, their oracles together; the rest (base, held-out sets, settings) of the first."""
    out = {**results[0], "runs": {}, "oracle": {name: {} for name in SETS}, "oracle_tasks": {name: [] for name in SETS}}
    for r in results:
        for mode, runs in r["runs"].items():
            out["runs"].setdefault(mode, []).extend(runs)
        for name in SETS:
            out["oracle"][name].update(r["oracle"][name])
            out["oracle_tasks"][name] += [t for t in r["oracle_tasks"][name] if t not in out["oracle_tasks"][name]]
    for runs in out["runs"].values():
        runs.sort(key=lambda x: x["seed"])
    out["data_s"] = max(r["data_s"] for r in results)
    out["total_s"] = max((r["total_s"] for r in results if "total_s" in r), default=float("nan"))
    return out


def _share(base: dict, method: dict, oracle: dict, key: str) -> float:
    """(base - method) / (base - oracle) of figure `key`: the share of the oracle's reduction a method reaches."""
    return (base[key] - method[key]) / (base[key] - oracle[key])


def _fmt(values: list[float], fmt: str = "{:.4f}", scale: float = 1.0) -> str:
    if not values:
        return "—"
    mean, lo, hi = (fmt.format(scale * x) for x in (statistics.fmean(values), min(values), max(values)))
    return mean if len(values) == 1 else f"{mean} ({lo}–{hi})"


def table_md(r: dict) -> str:
    sm = summary(r)
    s = r["settings"]
    head = ["method", "runs", "KL seen tasks (held-out trajectories)", "KL unseen tasks",
            "share of oracle's reduction, seen", "share, unseen", "KL at convention rows, seen", "unseen",
            "its share of the oracle's, seen", "unseen", "convention top-1, seen", "unseen"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    counts = {"base": "—", "teacher": "—", "oracle": "1 per task, seed 0"}
    for method, runs in r["runs"].items():  # the seeds that ran (a run cut short has fewer than settings asked)
        counts[method] = "seeds " + ", ".join(str(x["seed"]) for x in runs)
    for method in ("teacher", "base", "static", "hypernetwork", "oracle"):
        m = sm[method]
        cells = [method, counts[method]]
        for name in SETS:
            if method == "oracle":
                cells.append(f"{_fmt(m[name]['kl_oracle_tasks'])} (its tasks; base {m[name]['base_oracle_tasks']:.4f})"
                             if name in m else "—")  # fmt: skip
            else:
                cells.append(_fmt(m[name]["kl"]))
        for key in ("share", "kl_conv", "share_conv"):
            for name in SETS:
                values = [v for v in m.get(name, {}).get(key, []) if v is not None]
                cells.append(_fmt(values, "{:.0f}", 100) + " %" if key.startswith("share") and values
                             else _fmt(values, "{:.3f}"))  # fmt: skip
        for name in SETS:
            cells.append(_fmt(m[name]["conv"], "{:.3f}") if name in m else "—")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [""]
    for name in SETS:
        rows = aggregate(r["base"][name])
        notes.append(f"- {name}: {sum(r['heldout'][name].values())} held-out trajectories of {len(r['heldout'][name])} "
                     f"tasks, {rows['rows']:.0f} rows, {rows['convention_tokens']} convention tokens; oracle tasks "
                     f"({len(r['oracle_tasks'][name])}): {', '.join(r['oracle_tasks'][name])}")  # fmt: skip
    spreads = [x["delta_spread"] for x in r["runs"]["hypernetwork"] if "delta_spread" in x]
    if spreads:
        notes.append("- hypernetwork LoRA, between-task spread / within-task spread (relative to the mean delta): "
                     + ", ".join(f"{x['between_tasks']:.3f} / {x['within_task']:.3f}" for x in spreads))
    train_s = [x["train_s"] for runs in r["runs"].values() for x in runs]
    lrs = {mode: str(lr) for mode, lr in s.get("lr", ())}
    notes.append(f"- peak lr: static and oracles {lrs.get('static', 'the config')}, hypernetwork "
                 f"{lrs.get('hypernetwork', 'the config')}")
    notes.append(f"- {s['steps']} optimizer steps per run; train {statistics.fmean(train_s):.0f} s per run (mean); "
                 f"data {r['data_s'] / 60:.1f} min; total {r.get('total_s', float('nan')) / 60:.1f} min")
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, one seed, one oracle per set: a smoke run")
    parser.add_argument("--steps", type=int, help="override the optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds of static and hypernetwork")
    parser.add_argument("--oracle-seen", type=int, help="override the number of seen tasks with an oracle")
    parser.add_argument("--oracle-unseen", type=int, help="override the number of unseen tasks with an oracle")
    parser.add_argument("--lr-static", type=float, help="peak lr of static and the oracles (default: the config's)")
    parser.add_argument("--lr-hypernetwork", type=float, help="peak lr of the hypernetwork (default: the config's)")
    parser.add_argument("--threads", type=int, help="torch threads (default 2; 1 when two benches share 2 cores)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-hyper"), help="caches and runs go here")
    parser.add_argument("--json", dest="json_path", help="raw results (default: WORKDIR/hyper.json)")
    parser.add_argument("--table", metavar="JSON", nargs="+",
                        help="only print the table of previous --json outputs (several: benches of other seeds or "
                             "oracles on the same workdir, merged)")
    args = parser.parse_args(argv)
    if args.table:
        import json

        print(table_md(merge([json.loads(Path(p).read_text()) for p in args.table])))
        return 0
    s = QUICK if args.quick else FULL
    lrs = tuple((mode, lr) for mode, lr in (("static", args.lr_static), ("hypernetwork", args.lr_hypernetwork))
                if lr is not None)  # fmt: skip
    for field, value in (("steps", args.steps), ("threads", args.threads), ("seeds", tuple(args.seeds or ()) or None),
                         ("lr", lrs or None), ("oracle_seen", args.oracle_seen),
                         ("oracle_unseen", args.oracle_unseen)):  # fmt: skip
        if value is not None:
            s = dataclasses.replace(s, **{field: value})
    workdir = Path(args.workdir).resolve()
    print(table_md(run(s, workdir, args.json_path or str(workdir / "hyper.json"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
