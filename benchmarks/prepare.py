"""prepare-data and the hand-off to stage 1, on generated trajectories of the published shape
(common.synthetic_trajectories), printed as markdown tables:

(a) throughput: prepare-data (stream, render with the student's template, write manifest and rendered parts) on
    real-size trajectories (~135 messages, ~310k characters, ~80k tokens each) with 1 and 2 workers;
    trajectories/s and tokens/s over the whole command (worker start-up included).
(b) the cost of loading one part in stage 1 (`load_shard_samples`: fingerprint checks + reading the part's
    token arrays) with 1x and 10x as many rows in the source, at the same rows per part (num_shards scaled):
    goal, the same within noise. Beside it, what the load cost before prepare-data wrote parts: parsing every
    row of the source (a lower bound of the old per-part re-parse-and-render).
(c) peak memory (max RSS of the prepare-data process, which spills samples and assembles each part; the
    render workers hold a tokenizer and a few batches) at 1x and 10x, same rows per part: goal, bounded by
    the part being written (10x about 1x), not growing with the dataset.

    python -m benchmarks.prepare            # ~3-4 minutes on 2 cores
    python -m benchmarks.prepare --quick    # a smoke run
Run it under the heavy lock on a shared machine (`flock /tmp/hd-heavy.lock ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ~55 KB, 104 messages: the trajectories the old per-part cost was measured on.
MEDIUM = {"assistant_turns": 50, "tool_output_chars": 800}

CHILD = """
import json, resource, sys, time
from common.config import load_config
from common.manifest import prepare_data
from common.models import load_tokenizer
cfg = load_config(sys.argv[1], sys.argv[3:])
tokenizer = load_tokenizer(cfg.student.model)
summary = prepare_data(cfg, tokenizer, workers=int(sys.argv[2]))
# The parent's peak: it holds the spill writer and assembles each part. (A worker's own peak cannot be read
# from RUSAGE_CHILDREN: Linux carries the parent's peak into forked children.)
print(json.dumps({"seconds": summary.seconds, "kept": summary.kept, "tokens": summary.n_tokens,
                  "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _sets(source: Path, out: Path, num_shards: int) -> list[str]:
    return [f"data.source={source}", f"manifest={out / 'manifest.jsonl'}", "data.resolved_only=false",
            "data.max_tokens=200000", "teacher.max_model_len=200000", f"data.num_shards={num_shards}",
            "data.heldout_fraction=0.05"]  # fmt: skip


def prepare_in_child(source: Path, out: Path, num_shards: int, workers: int) -> dict:
    """prepare-data in a fresh process, so that its peak RSS is its own."""
    cmd = [sys.executable, "-c", CHILD, str(REPO / "configs" / "demo.yaml"), str(workers),
           *_sets(source, out, num_shards)]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_load_seconds(out: Path, source: Path, num_shards: int, parts: int, reps: int) -> tuple[float, int]:
    """Median seconds of load_shard_samples over the first `parts` parts (`reps` rounds), and samples read."""
    from common.config import load_config
    from common.manifest import load_shard_samples
    from common.models import load_tokenizer

    cfg = load_config(REPO / "configs" / "demo.yaml", _sets(source, out, num_shards))
    tokenizer = load_tokenizer(cfg.student.model)
    times, n = [], 0
    for _ in range(reps):
        for shard in range(parts):
            t0 = time.perf_counter()
            samples = load_shard_samples(cfg, tokenizer, shard)
            times.append(time.perf_counter() - t0)
            n += len(samples)
    return statistics.median(times), n // reps


def parse_all_seconds(source: Path) -> float:
    """What every part load paid before: parse every row of the source (no rendering counted)."""
    from common.config import DataConfig
    from common.trajectories import load_trajectories

    t0 = time.perf_counter()
    load_trajectories(DataConfig(source=str(source), resolved_only=False))
    return time.perf_counter() - t0


def run(quick: bool) -> dict:
    from common.synthetic_trajectories import write_jsonl

    big_n = 4 if quick else 32
    base_rows, base_shards = (30, 10) if quick else (100, 32)
    result: dict = {"quick": quick}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp_name:
        tmp = Path(tmp_name)
        # (a) throughput on real-size trajectories
        big = tmp / "big" / "rows.jsonl"
        big.parent.mkdir()
        write_jsonl(big, big_n)
        result["real_size"] = {"rows": big_n, "bytes": big.stat().st_size}
        result["throughput"] = {w: prepare_in_child(big, tmp / f"big-w{w}", 4, w) for w in (1, 2)}
        # (b), (c): 1x and 10x rows of ~55 KB, same rows per part
        for scale in (1, 10):
            src = tmp / f"x{scale}" / "rows.jsonl"
            src.parent.mkdir()
            write_jsonl(src, base_rows * scale, first_seed=1000, **MEDIUM)
            shards = base_shards * scale
            out = tmp / f"x{scale}-out"
            prep = prepare_in_child(src, out, shards, 2)
            load_s, samples = part_load_seconds(out, src, shards, parts=8, reps=3)
            part_bytes = _part_bytes(out)
            result[f"x{scale}"] = {"rows": base_rows * scale, "source_bytes": src.stat().st_size, "num_shards": shards,
                                   "prepare": prep, "part_load_s": load_s, "samples_per_part": samples / 8,
                                   "largest_part_bytes": part_bytes, "parse_all_s": parse_all_seconds(src)}
    return result


def _part_bytes(out: Path) -> int:
    parts = out / "manifest.rendered.zarr" / "parts"
    return max(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in parts.iterdir())


def markdown(r: dict) -> str:
    lines = ["### (a) prepare-data throughput, real-size trajectories "
             f"({r['real_size']['rows']} rows, {r['real_size']['bytes'] / r['real_size']['rows'] / 1e3:.0f} kB each)",
             "", "| workers | seconds | trajectories/s | tokens/s |", "|---|---|---|---|"]
    for w, t in r["throughput"].items():
        lines.append(f"| {w} | {t['seconds']:.1f} | {t['kept'] / t['seconds']:.2f} | {t['tokens'] / t['seconds']:,.0f} |")
    lines += ["", "### (b) one part's load in stage 1 and (c) prepare-data's peak memory, same rows per part", "",
              "| source rows | parts | samples/part | part load (median) | parse every row (old floor) "
              "| prepare-data max RSS | largest part on disk |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for scale in (1, 10):
        x = r[f"x{scale}"]
        p = x["prepare"]
        lines.append(f"| {x['rows']:,} ({x['source_bytes'] / 1e6:.0f} MB) | {x['num_shards']} | "
                     f"{x['samples_per_part']:.1f} | {x['part_load_s'] * 1e3:.1f} ms | {x['parse_all_s']:.2f} s | "
                     f"{p['max_rss_kib'] / 1024:.0f} MiB | "
                     f"{x['largest_part_bytes'] / 1e3:.0f} kB |")
    one, ten = r["x1"], r["x10"]
    ratio = ten["part_load_s"] / one["part_load_s"]
    rss = ten["prepare"]["max_rss_kib"] / one["prepare"]["max_rss_kib"]
    lines += ["", f"part load 10x / 1x: {ratio:.2f} (goal: the same within noise); "
              f"prepare-data peak RSS 10x / 1x: {rss:.2f} (goal: bounded by the part, ~1)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args.quick)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
