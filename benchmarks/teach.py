"""Does it still teach? Held-out KL after the same training budget, per kind of teacher signal.

On the demo set-up (bundled sample, tiny teacher and student, configs/demo.yaml), under one output folder
(runs/teach/ by default, never runs/demo):
  1. prepare-data once (trajectories cut to Settings.max_tokens);
  2. stage 1 with the reference HF backend, once per cache variant (the same samples and row positions in
     all): top-K=128 fp16; mass-adaptive K (mass_epsilon 1e-2: with the tiny teacher's flat distributions
     it keeps nearly every row whole, and 1e-3 would keep all of them, so only 1e-2 runs); sampled rows
     (cache.rows=sampled: N=64 with two draw seeds, and N=16); top-K=8 (to show the bias of a small K);
  3. stage 2 in this process (one rank, no FSDP), the SAME budget for every variant: same steps, seed, lr,
     batches and held-out set, and for the top-128 cache's rows also `online`: the tiny teacher resident in
     stage 2, distilled over the full vocabulary (the ideal every cache approximates);
  4. every run with train.eval_teacher, so all are measured by one yardstick: held-out KL(teacher || student)
     over the full vocabulary (151,936 ids) at T = 1, before and after training, and top-1 agreement with
     the teacher's argmax.

    python -m benchmarks.teach [--quick] [--seeds 0 1 2] [--steps 20] [--workdir runs/teach] [--json out.json]

Prints a markdown table: variant, cache bytes per row (top-K arrays on disk), held-out
full-vocabulary KL before -> after (mean and min-max over seeds), the share of online's KL reduction that the
variant achieves, top-1 agreement, and train seconds per run. The manifest and caches persist under the
workdir, one folder per data setting, and a re-run reuses them (stage 1 skips complete parts); training runs
are always redone from scratch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


@dataclass(frozen=True)
class Settings:
    max_tokens: int
    """Trajectories are cut to this many tokens (prepare-data), and it is the training context length."""
    steps: int
    """Optimizer steps per training run (batch 2, one process)."""
    seeds: tuple[int, ...]
    """train.seed of the repeats (hypernetwork init and data order; the caches are the same for all)."""
    draws: tuple[int, ...]
    """Draws per row of the sampled caches, one cache each."""
    draw_seeds: tuple[int, ...]
    """cache.sample_seed of the sampled caches at the first `draws`: the draws' own randomness, which the
    training seeds do not vary."""
    heldout_fraction: float
    """data.heldout_fraction: the demo's 0.2 holds out 2 of the 17 sample trajectories, 0.4 holds out 3: less noise."""
    threads: int
    """torch threads: 1, so that a busy neighbour on the shared 2-core machine slows every variant alike."""


# About 20 minutes on the shared 2-core VM: 7 variants x 3 seeds x 20 steps at 768 tokens (~50 s a run).
FULL = Settings(max_tokens=768, steps=20, seeds=(0, 1, 2), draws=(64, 16), draw_seeds=(0, 1), heldout_fraction=0.4,
                threads=1)
QUICK = Settings(max_tokens=512, steps=3, seeds=(0,), draws=(16,), draw_seeds=(0,), heldout_fraction=0.4, threads=1)


@dataclass(frozen=True)
class CacheVariant:
    name: str
    overrides: tuple[str, ...]


def cache_variants(s: Settings) -> list[CacheVariant]:
    sampled = [
        CacheVariant(f"sampled N={n}" + (f", draw seed {seed}" if seed else ""),
                     ("cache.k=128", "cache.rows=sampled", f"cache.draws={n}", f"cache.sample_seed={seed}"))
        for i, n in enumerate(s.draws) for seed in (s.draw_seeds if i == 0 else s.draw_seeds[:1])
    ]  # fmt: skip
    return [
        CacheVariant("top-K 128", ("cache.k=128",)),
        CacheVariant("mass-adaptive ε=1e-2", ("cache.k=128", "cache.mass_epsilon=1e-2")),
        *sampled,
        CacheVariant("top-K 8", ("cache.k=8",)),
    ]


ONLINE = "online (full vocabulary)"
ONLINE_CACHE = "top-K 128"  # the cache whose tokens, rows and prompts the online run reads


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def data_dir(s: Settings, workdir: Path) -> Path:
    """Manifest, caches and training runs, one folder per data setting: a run with other settings never
    reuses another's manifest or caches."""
    return workdir / f"data-{s.max_tokens}tok-heldout{s.heldout_fraction}"


def base_overrides(s: Settings, workdir: Path) -> list[str]:
    """The demo config pointed at `workdir`, reference teacher backend, shorter context, the experiment's budget."""
    return [
        f"manifest={data_dir(s, workdir) / 'manifest.jsonl'}",
        "teacher.backend=hf",
        f"data.max_tokens={s.max_tokens}",
        "data.overlong=truncate",
        f"data.heldout_fraction={s.heldout_fraction}",
        f"train.phases=[{{name: main, epochs: 100, seq_len: {s.max_tokens}}}]",
        f"train.max_steps={s.steps}",
        "train.warmup_steps=3",
        "train.eval_every=1000000",
        "train.checkpoint_every=1000000",
        "train.log_every=1000000",
        "train.eval_teacher=true",
    ]


def build_caches(s: Settings, workdir: Path) -> dict[str, dict]:
    """prepare-data once, then stage 1 per cache variant; returns name -> {path, bytes_per_row, rows, seconds}."""
    from cache_schema.inspect import inspect_cache
    from common.config import load_config
    from common.manifest import prepare_data
    from common.models import load_tokenizer
    from stage1_teacher.run import main as stage1_main

    cfg = load_config(DEMO_CONFIG, base_overrides(s, workdir))
    if not Path(cfg.manifest).exists():
        prepare_data(cfg, load_tokenizer(cfg.student.model))
    caches = {}
    for v in cache_variants(s):
        path = data_dir(s, workdir) / "caches" / f"{slug(v.name)}.zarr"
        vcfg = load_config(DEMO_CONFIG, [*base_overrides(s, workdir), f"cache.path={path}", *v.overrides])
        t0 = time.perf_counter()
        summary = stage1_main(vcfg)
        info = inspect_cache(str(path))
        caches[v.name] = {
            "path": str(path),
            "bytes_per_row": info["topk_bytes_per_row"],
            "rows": info.get("rows"),
            **row_stats(str(path)),
            "stage1_s": time.perf_counter() - t0,
            "stage1_rows_written": summary.rows,
        }
        print(f"cache '{v.name}': {info['topk_bytes_per_row']:.1f} top-K bytes/row", file=sys.stderr, flush=True)
    return caches


def row_stats(path: str) -> dict[str, float]:
    """Mean entries per row and mean teacher mass on them (1 - tail), over the whole cache."""
    import numpy as np

    from cache_schema import CacheReader

    entries, mass, rows = 0.0, 0.0, 0
    for sample in CacheReader(path):
        lp = np.asarray(sample.topk_logprobs, dtype=np.float64)  # [R, K], padding entries exp() to 0
        entries += float((lp > -1e4).sum())
        mass += float(np.exp(lp).sum())
        rows += lp.shape[0]
    return {"entries_per_row": entries / max(rows, 1), "mass_per_row": mass / max(rows, 1)}


def train_once(s: Settings, workdir: Path, cache_path: str, name: str, seed: int, online: bool,
               cache_overrides: tuple[str, ...] = ()) -> dict:
    """One training run in this process (one rank, no process group: no FSDP) from scratch; `cache_overrides`
    say what the cache holds (stage 2 refuses a config whose cache.k or cache.rows differ from the cache's)."""
    from common.config import load_config
    from stage2_student.distributed import DistEnv
    from stage2_student.train import train

    out = data_dir(s, workdir) / "train" / f"{slug(name)}-{s.steps}steps-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would be resumed, not retrained
    overrides = [*base_overrides(s, workdir), f"cache.path={cache_path}", f"train.output_dir={out}",
                 f"train.seed={seed}", f"train.online_teacher={'true' if online else 'false'}",
                 *cache_overrides]  # fmt: skip
    cfg = load_config(DEMO_CONFIG, overrides)
    t0 = time.perf_counter()
    result = train(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    result["seconds"] = time.perf_counter() - t0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if m.get("split") == "eval"]
    result["top1_full_before"] = evals[0]["top1_full"]
    result["heldout_rows"] = evals[0]["rows"]
    print(f"  {name}, seed {seed}: full-vocab KL {result['kl_full_before']:.4f} -> {result['kl_full_after']:.4f} "
          f"in {result['seconds']:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    return result


def run(s: Settings, workdir: Path) -> dict:
    torch.set_num_threads(s.threads)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    caches = build_caches(s, workdir)
    runs: dict[str, list[dict]] = {}
    overrides = {v.name: v.overrides for v in cache_variants(s)}
    variants = [(ONLINE, caches[ONLINE_CACHE]["path"], True, overrides[ONLINE_CACHE])]
    variants += [(n, c["path"], False, overrides[n]) for n, c in caches.items()]
    for seed in s.seeds:  # seeds outermost: a cut-short run still has every variant at the first seeds
        for name, path, online, cache_sets in variants:
            runs.setdefault(name, []).append(train_once(s, workdir, path, name, seed, online, cache_sets))
    return {
        "settings": dataclasses.asdict(s),
        "caches": caches,
        "runs": runs,
        "total_s": time.perf_counter() - t0,
    }


# ---- markdown -----------------------------------------------------------------------------------------------


def _mean_range(values: list[float], fmt: str) -> str:
    mean, lo, hi = (fmt.format(x) for x in (statistics.fmean(values), min(values), max(values)))
    return mean if lo == hi else f"{mean} ({lo}–{hi})"


def table_md(r: dict) -> str:
    runs, caches = r["runs"], r["caches"]
    online = {x["seed"]: x for x in _with_seeds(runs[ONLINE], r)}
    rows = []
    for name, results in runs.items():
        results = _with_seeds(results, r)
        after = [x["kl_full_after"] for x in results]
        before = [x["kl_full_before"] for x in results]
        # Per seed: the share of online's KL reduction this variant achieves (online = 100 %).
        share = [
            (x["kl_full_before"] - x["kl_full_after"]) / (x["kl_full_before"] - online[x["seed"]]["kl_full_after"])
            for x in results
        ]
        ratio = [x["kl_full_after"] / online[x["seed"]]["kl_full_after"] for x in results]
        if name == ONLINE:
            bpr = "— (teacher resident)"
        else:
            c = caches[name]
            bpr = f"{c['bytes_per_row']:.0f} ({c['entries_per_row']:.0f} ids, mass {c['mass_per_row']:.2f})"
        rows.append([
            name, bpr, f"{_mean_range(before, '{:.4f}')} → {_mean_range(after, '{:.4f}')}",
            _mean_range(ratio, "{:.3f}"), _mean_range([100 * x for x in share], "{:.0f}") + " %",
            f"{_mean_range([x['top1_full_before'] for x in results], '{:.3f}')} → "
            f"{_mean_range([x['top1_full_after'] for x in results], '{:.3f}')}",
            _mean_range([x["seconds"] for x in results], "{:.0f}"),
        ])  # fmt: skip
    headers = ["variant", "row bytes on disk (mean ids/row, teacher mass on them)",
               "held-out full-vocab KL before → after", "KL after / online's", "share of online's KL reduction",
               "top-1 vs teacher argmax before → after", "train s/run"]  # fmt: skip
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    s = r["settings"]
    n_rows = runs[ONLINE][0]["heldout_rows"]
    notes = [
        "",
        f"{s['steps']} optimizer steps per run (batch 2, seq_len {s['max_tokens']}, lr {_demo_lr():g}, 3 warmup steps), "
        f"seeds {', '.join(map(str, s['seeds']))}; mean (min–max over seeds). Held-out: {n_rows:.0f} rows of "
        f"the trajectories data.heldout_fraction={s['heldout_fraction']} selects. "
        f"Total {r['total_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines + notes)


def _demo_lr() -> float:
    from common.config import load_config

    return load_config(DEMO_CONFIG).train.lr


def _with_seeds(results: list[dict], r: dict) -> list[dict]:
    return [{**x, "seed": seed} for x, seed in zip(results, r["settings"]["seeds"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short context, 3 steps, one seed: a smoke run")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--steps", type=int, help="override the optimizer steps per run")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "teach"), help="caches and runs go here")
    parser.add_argument("--json", dest="json_path", help="also write every raw result to this file")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.seeds:
        s = dataclasses.replace(s, seeds=tuple(args.seeds))
    if args.steps:
        s = dataclasses.replace(s, steps=args.steps)
    workdir = Path(args.workdir).resolve()
    if workdir == (REPO / "runs" / "demo").resolve():
        print("error: --workdir must not be runs/demo (the demo's own outputs)", file=sys.stderr)
        return 2
    result = run(s, workdir)
    print(table_md(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
