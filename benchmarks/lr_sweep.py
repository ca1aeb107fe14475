"""Learning-rate sweep of stage 2 (the demo, or another config: configs/testbed.yaml): held-out KL and the size of
the LoRA deltas, per lr.

    python -m benchmarks.lr_sweep [--lrs 1e-4 3e-4 1e-3] [--steps 30] [--config configs/demo.yaml]
                                  [--workdir runs/lr-sweep/CONFIG_NAME] [--set KEY=VALUE ...] [--json out.json]

For each lr, one training run in this process (one rank, no FSDP) from scratch, on the config's cache (built
first with the reference HF backend under the workdir when it does not exist: prepare-data + stage 1), with
the config's schedule (warmup, cosine) cut to --steps optimizer steps and a held-out evaluation every 10.
A global forward hook on the HyperNetwork records, per training step, the Frobenius norm of every generated
delta (alpha / r) * B A, as a share of its frozen weight's norm ||W||_F: the quantity that ran away before
the heads' lr was scaled (stage2_student/hypernet.py). Prints a markdown table: lr, held-out forward KL
(top-K + tail, the training loss) at steps 0 / 10 / 20 / last, top-1 at the last, the largest
||delta||/||W|| over targets after 1, 10 and all but the last update, and seconds per run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def delta_norms(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict[str, float]:
    """target -> mean over the batch of ||scale * B A||_F, from r x r Gram matrices (no [d_out, d_in] product)."""
    out = {}
    with torch.no_grad():
        for name, (a, b) in lora.items():
            gram = torch.einsum("nor,nos->nrs", b.float(), b.float()) @ torch.einsum("nri,nsi->nrs", a.float(), a.float())
            out[name] = (scale * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=0).sqrt()).mean().item()
    return out


def ensure_cache(cfg) -> None:
    from cache_schema import CacheReader
    from common.manifest import prepare_data
    from common.models import load_tokenizer
    from stage1_teacher.run import main as stage1_main

    try:
        if len(CacheReader(cfg.cache.path)) > 0:
            return
    except Exception:  # no cache yet
        pass
    prepare_data(cfg, load_tokenizer(cfg.student.model))
    stage1_main(cfg)


def weight_norms(cfg) -> dict[str, float]:
    from common.models import load_causal_lm
    from stage2_student.targets import resolve_targets

    student = load_causal_lm(cfg.student.model, cfg.student.dtype)
    modules = dict(student.named_modules())
    return {t.name: modules[t.name].weight.float().norm().item() for t in resolve_targets(student, cfg.hyper.targets)}


def run_one(config: str, overrides: list[str], lr: float, steps: int, workdir: Path) -> dict:
    from common.config import load_config
    from stage2_student.distributed import DistEnv
    from stage2_student.hypernet import HyperNetwork
    from stage2_student.train import train

    out = workdir / f"lr{lr:g}"
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would be resumed, not retrained
    cfg = load_config(config, [*overrides, f"train.output_dir={out}", f"train.lr={lr}", f"train.max_steps={steps}",
                               "train.eval_every=10", "train.checkpoint_every=1000000"])  # fmt: skip
    w = weight_norms(cfg)
    per_step: list[float] = []

    def hook(module, _args, lora):
        if isinstance(module, HyperNetwork) and module.training:
            norms = delta_norms(lora, module.lora_scale)
            per_step.append(max(norms[k] / w[k] for k in norms))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    t0 = time.perf_counter()
    try:
        train(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    finally:
        handle.remove()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m for m in metrics if m["split"] == "eval"}
    grad_accum = cfg.train.grad_accum
    # One hypernetwork forward per micro-batch; the delta at step s is the one step s trained on.
    per_opt_step = per_step[::grad_accum]
    return {
        "lr": lr,
        "kl": {s: evals[s]["kl"] for s in sorted(evals)},
        "top1": {s: evals[s]["top1"] for s in sorted(evals)},
        "train_loss": [m["loss"] for m in metrics if m["split"] == "train"],
        "delta_over_w": per_opt_step,
        "seconds": time.perf_counter() - t0,
    }


def table_md(results: list[dict]) -> str:
    head = ["lr", "held-out KL step 0", "10", "20", "last", "top-1 last", "max ‖ΔW‖/‖W‖ after 1 update", "10",
            "last", "s/run"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        kl, d = r["kl"], r["delta_over_w"]  # d[k]: the delta the (k+1)-th step trained with, after k updates
        steps = sorted(kl, key=int)
        row = [f"{r['lr']:g}", *(f"{kl[s]:.3f}" if s in kl else "—" for s in steps[:3]), f"{kl[steps[-1]]:.3f}",
               f"{r['top1'][steps[-1]]:.3f}", f"{d[1]:.3g}" if len(d) > 1 else "—",
               f"{d[10]:.3g}" if len(d) > 10 else "—", f"{d[-1]:.3g} ({len(d) - 1})", f"{r['seconds']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", help="manifest, cache and runs (default: runs/lr-sweep/ + the config's file name "
                        "without .yaml: each config its own cache)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--table", metavar="JSON", help="only print the table of a sweep's --json output")
    args = parser.parse_args(argv)
    if args.table:
        print(table_md(json.loads(Path(args.table).read_text())))
        return 0
    from common.config import load_config

    workdir = Path(args.workdir or REPO / "runs" / "lr-sweep" / Path(args.config).stem).resolve()
    if workdir == (REPO / "runs" / "demo").resolve():
        print("error: --workdir must not be runs/demo (the demo's own outputs)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    overrides = [f"manifest={workdir / 'manifest.jsonl'}", f"cache.path={workdir / 'cache.zarr'}",
                 "teacher.backend=hf", *args.overrides]  # fmt: skip
    ensure_cache(load_config(args.config, overrides))
    results = []
    for lr in args.lrs:
        results.append(run_one(args.config, overrides, lr, args.steps, workdir))
        r = results[-1]
        print(f"lr {lr:g}: held-out KL {r['kl']}", file=sys.stderr, flush=True)
        if args.json_path:  # after every run, so a cut-short sweep keeps what it has
            Path(args.json_path).write_text(json.dumps(results, indent=1) + "\n")
    print(table_md(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
