"""The `hyperdistill` command line, every command in this one module: parse, load the config, call one
function per command. Commands that run on a config take the same `--config` / `--set`; every command turns
a UserError into one line `error: ...` and exit code 2 (`reports_user_errors`). Heavy modules (torch, zarr,
vLLM) are imported inside the commands, so `hyperdistill --help` stays fast.

Exit codes: 0 success, 1 the work ran but found problems (e.g. `cache verify`), 2 bad input or config
(one line `error: ...` naming the file, sample or field), other codes for crashes (with a traceback).
"""

from __future__ import annotations

import logging
import sys

import click

from common.errors import UserError, reports_user_errors

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default="configs/demo.yaml", show_default=True,
    help="Run config (YAML) from configs/.",
)  # fmt: skip
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config field, e.g. --set cache.k=64 (repeatable; the value is read as YAML).",
)  # fmt: skip


def _load(config_path: str, overrides: tuple[str, ...]):
    from common.config import load_config

    return load_config(config_path, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """hyperdistill: distil a coding-agent teacher into a hybrid student through a hypernetwork that
    writes per-task LoRA weights.

    \b
    Pipeline:  build-models -> prepare-data -> teacher-cache -> cache verify -> train-student -> export-lora
    """
    # Structured `event key=value` lines from our modules on stderr (vLLM configures its own logger).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command("build-models")
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists.")
@reports_user_errors
def build_models_cmd(force: bool) -> None:
    """Build (once) and cache the embedded tiny teacher and student on the real Qwen vocabulary."""
    from common.models import build_tiny_models

    for name, path in build_tiny_models(force=force).items():
        click.echo(f"{name}: {path}")


@main.command("prepare-data")
@config_option
@set_option
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes rendering trajectories (default: every core of this machine). The output does not "
                   "depend on it.")
@reports_user_errors
def prepare_data_cmd(config_path: str, overrides: tuple[str, ...], workers: int | None) -> None:
    """Stream, filter and render trajectories; write the manifest (ids, lengths, shard, held-out flag of each)
    and the rendered samples, one part per shard, that stage 1 reads."""
    from common.manifest import NothingKept, default_workers, prepare_data
    from common.models import load_tokenizer

    cfg = _load(config_path, overrides)
    tokenizer = load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    try:
        summary = prepare_data(cfg, tokenizer, workers=workers or default_workers())
    except NothingKept as e:  # show why, as a run that keeps something does; then the one-line error
        click.echo("\n".join(e.drops), err=True)
        raise
    click.echo(summary.format())


@main.command("teacher-cache")
@config_option
@set_option
@click.option("--shard", "shard_spec", default=None, metavar="I|A-B",
              help="Run only this shard, or the inclusive range A-B (a scheduler's array task).")
@click.option("--num-shards", type=int, default=None, help="Must equal data.num_shards; a guard for schedulers.")
@reports_user_errors
def teacher_cache_cmd(config_path: str, overrides: tuple[str, ...], shard_spec: str | None, num_shards: int | None) -> None:
    """Stage 1: score trajectories with the teacher and fill the top-K cache, shard by shard.

    A complete part is skipped, an interrupted one is redone, one leased by another live process is
    left alone. Exit code 0 when every requested shard is complete, 3 when some were busy elsewhere.
    """
    from stage1_teacher.run import main as stage1_main

    cfg = _load(config_path, overrides)
    summary = stage1_main(cfg, shards=_parse_shards(shard_spec), num_shards=num_shards)
    click.echo(summary.format())
    if summary.shards_busy:
        sys.exit(3)


def _parse_shards(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    first, _, last = spec.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise UserError(f"--shard {spec!r}: expected a shard index I or an inclusive range A-B") from None
    if hi < lo:
        raise UserError(f"--shard {spec!r}: empty range")
    return list(range(lo, hi + 1))


@main.command("train-student", context_settings={"ignore_unknown_options": True})
@config_option
@set_option
@click.option("--nproc", type=int, default=2, show_default=True, help="Processes (GPUs) on this node for torchrun.")
@reports_user_errors
def train_student_cmd(config_path: str, overrides: tuple[str, ...], nproc: int) -> None:
    """Stage 2: train the hypernetwork on the cache with FSDP2 (launches torchrun on this node).

    Checks the config, the cache and train.output_dir first, and leases the folder to this run. Resumes from
    the newest checkpoint in train.output_dir. For several nodes, call torchrun directly
    (see README: `torchrun --nnodes ... -m hyperdistill.cli train-worker`).
    """
    from stage2_student.launch import launch

    sys.exit(launch(_load(config_path, overrides), config_path, overrides, nproc))


@main.command("train-worker")
@config_option
@set_option
@reports_user_errors
def train_worker_cmd(config_path: str, overrides: tuple[str, ...]) -> None:
    """Stage 2 in one process of a torchrun launch (what train-student runs on every rank).

    \b
    For several nodes, on each node:
      torchrun --nnodes N --nproc_per_node G --rdzv_backend c10d --rdzv_endpoint HOST:PORT \\
        -m hyperdistill.cli train-worker --config CONFIG [--set KEY=VALUE ...]
    A bad config or cache is reported once, by rank 0 (exit code 2).
    """
    from stage2_student.train import main as train_main

    sys.exit(train_main(config_path, overrides))


@main.command("preflight")
@config_option
@set_option
@click.option("--world-size", type=int, default=8, show_default=True, help="Ranks the run will use (memory estimate).")
@reports_user_errors
def preflight_cmd(config_path: str, overrides: tuple[str, ...], world_size: int) -> None:
    """Stage 2 checks before a run: targets, zero-init equivalence, gradient flow, cache/student
    compatibility, memory headroom. Exit code 1 if any check fails."""
    from stage2_student.preflight import format_checks, run_preflight

    checks = run_preflight(_load(config_path, overrides), world_size=world_size)
    click.echo(format_checks(checks))
    if not all(c.ok for c in checks):
        sys.exit(1)


@main.command("headroom")
@config_option
@set_option
@click.option("--samples", type=int, default=300, show_default=True,
              help="Cached samples to read (a seeded subset; all of them when the cache holds fewer).")
@click.option("--split", type=click.Choice(["all", "heldout", "train"]), default="all", show_default=True,
              help="Read the whole cache, or only stage 2's held-out or training samples.")
@click.option("--group-by", type=click.Choice(["instance", "repo", "sample"]), default="instance", show_default=True,
              help="A sample's task: its instance id (from the manifest), its repository, or the sample itself.")
@click.option("--match-kl", type=float, default=0.05, show_default=True,
              help="A task whose KL (nats per row) is at most this already matches the teacher.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample subset.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@reports_user_errors
def headroom_cmd(config_path: str, overrides: tuple[str, ...], samples: int, split: str, group_by: str,
                 match_kl: float, seed: int, as_json: bool) -> None:
    """Before spending a node: the frozen base student's KL and top-1 agreement to the teacher's cached
    distribution, per task and overall, and the tasks where it already matches the teacher."""
    import json

    from stage2_student.headroom import measure

    report = measure(_load(config_path, overrides), samples, split, group_by, match_kl, seed)
    click.echo(json.dumps(report.as_dict(), indent=1) if as_json else report.format())


@main.command("param-count")
@config_option
@set_option
@reports_user_errors
def param_count_cmd(config_path: str, overrides: tuple[str, ...]) -> None:
    """Hypernetwork parameters for the config's student, built from its config only (no weights)."""
    from common.model_configs import model_config
    from stage2_student.param_count import count_hypernet_params

    cfg = _load(config_path, overrides)
    student, source = model_config(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    click.echo(f"student {cfg.student.model} (config: {source})")
    for key, value in count_hypernet_params(cfg, student).items():
        click.echo(f"{key:>28}: {value:,}" if isinstance(value, int) else f"{key:>28}: {value}")


@main.command("export-lora")
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(exists=True),
              help="A checkpoint step folder, or a run's train.output_dir (its newest checkpoint).")
@click.option("--prompt", "prompt", default=None, metavar="FILE|TEXT",
              help="The task prompt: a file to read, or the text itself (none for a static run).")
@click.option("--prompts-jsonl", "prompts_jsonl", default=None, type=click.Path(dir_okay=False),
              help='Batch mode: a JSONL of {"name": ..., "prompt": ...}; one adapter folder per line.')
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="The adapter folder (with --prompt), or the folder that receives one per name (batch).")
@click.option("--servable-only", is_flag=True,
              help="Keep only the target modules vLLM can serve LoRA on for this student.")
@reports_user_errors
def export_lora_cmd(checkpoint: str, prompt: str | None, prompts_jsonl: str | None, out: str,
                    servable_only: bool) -> None:
    """Run the trained hypernetwork on task prompts and write standard PEFT LoRA adapters.

    The run config comes from the checkpoint (no --config: the hypernetwork must be rebuilt as trained)."""
    import json
    from pathlib import Path

    from stage2_student.export import export_lora, read_prompt, read_prompts_jsonl

    if prompt is not None and prompts_jsonl is not None:
        raise UserError("export-lora: give exactly one of --prompt and --prompts-jsonl")
    if prompts_jsonl is None:
        target = Path(out)  # the single adapter goes exactly at --out; a static run's needs no prompt
        text = read_prompt(prompt) if prompt is not None else None
        folders = export_lora(checkpoint, [(target.name, text)], target.parent, servable_only)
    else:
        folders = export_lora(checkpoint, read_prompts_jsonl(prompts_jsonl), out, servable_only)
    for folder in folders:
        info = json.loads((folder / "export.json").read_text())
        dropped = f", {len(info['dropped_targets'])} not servable dropped" if info["dropped_targets"] else ""
        click.echo(f"{folder}: {info['targets']} target modules{dropped} ({info['prompt_tokens']} prompt tokens)")


@main.command("plan")
@config_option
@set_option
@click.option("--gpus", type=int, default=8, show_default=True, help="GPUs in all (nodes x GPUs per node).")
@click.option("--gpu-mem-gb", type=float, default=141.0, show_default=True, help="Memory per GPU (H200: 141).")
@click.option("--gpus-per-node", type=int, default=8, show_default=True, help="Stage 1 runs one job per node.")
@click.option("--bytes-per-row", type=float, default=None, help="Measured cache bytes per top-K row (make bench).")
@click.option("--mfu-teacher", type=float, default=None,
              help="Utilisation of the teacher's prefill (of the fp8 peak for an fp8 teacher); default: the "
                   "planner's stated assumption, printed in the plan.")
@click.option("--mfu-student", type=float, default=None,
              help="Utilisation of stage 2's forward/recompute/backward; default: the planner's assumption.")
@click.option("--allgather-gbps", type=float, default=None,
              help="FSDP2 all-gather bandwidth per GPU within a node; default: the planner's assumption.")
@reports_user_errors
def plan_cmd(config_path: str, overrides: tuple[str, ...], gpus: int, gpu_mem_gb: float, gpus_per_node: int,
             bytes_per_row: float | None, mfu_teacher: float | None, mfu_student: float | None,
             allgather_gbps: float | None) -> None:
    """Plan a run on paper: memory per GPU, work, cache size and hours per stage."""
    from hyperdistill.plan import format_plan, plan_run

    hardware = {key: value for key, value in (("mfu_teacher", mfu_teacher), ("mfu_student", mfu_student),
                                              ("allgather_gbps", allgather_gbps)) if value is not None}
    plan = plan_run(_load(config_path, overrides), gpus, gpu_mem_gb, gpus_per_node=gpus_per_node,
                    bytes_per_row=bytes_per_row, **hardware)
    click.echo(format_plan(plan))


# ---------------------------------------------------------------------------------------------
# hyperdistill cache ...: exit codes 0 fine, 1 verify found problems, 2 bad input


@main.group("cache")
def cache() -> None:
    """Inspect, verify and look into a logit cache (a local path or an fsspec URL)."""


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(f"{v:05d}" if isinstance(v, int) else str(v) for v in value) or "-"
    return str(value)


def _parse_pos(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--pos {text!r}: expected A:B with integers A < B") from None
    if a >= b:
        raise UserError(f"--pos {text!r}: expected A < B")
    return a, b


@cache.command("inspect", short_help="Summarise a cache: teacher, counts, parts, bytes per row.")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@reports_user_errors
def cache_inspect_cmd(path: str, as_json: bool) -> None:
    """Teacher, rows kind (top-K or sampled: draws, support, tail-draw fraction), K, encoding, samples /
    tokens / rows, parts complete, bytes on disk, bytes per row, entries (distinct ids) per row and
    compression ratio of the cache at PATH."""
    import json

    from cache_schema.inspect import inspect_cache

    info = inspect_cache(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        click.echo(f"{key:>20}: {_format(value)}")


@cache.command("verify", short_help="Check every part and sample; exit 1 if anything is wrong.")
@click.argument("path")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="JSONL manifest (lines with 'sample_id' or 'id', and 'shard'): every listed sample must be present.")
@click.option("--shard", "shards", type=int, multiple=True, help="Check only this shard (repeatable); default all.")
@reports_user_errors
def cache_verify_cmd(path: str, manifest: str | None, shards: tuple[int, ...]) -> None:
    """Read back every part and sample of the cache at PATH and check checksums, values, rank order, ids,
    positions and offsets. Prints each problem; exits 1 if there is any, 0 if the cache is clean."""
    from cache_schema.manifest import load_manifest_ids
    from cache_schema.verify import verify_cache

    ids = load_manifest_ids(manifest) if manifest else None
    report = verify_cache(path, ids, shards=list(shards) or None)
    for problem in report.problems:
        click.echo(str(problem))
    click.echo(report.summary())
    if not report.ok:
        sys.exit(1)


@cache.command("show", short_help="Print one sample's rows as a table of tokens and probabilities.")
@click.argument("path")
@click.argument("sample")
@click.option("--pos", default=None, metavar="A:B",
              help="Show rows at positions A <= t < B (default: the first 20 rows).")
@click.option("--tokenizer", default=None, metavar="PATH",
              help="Local tokenizer folder to decode ids (default: the path in the cache's metadata).")
@click.option("--raw-ids", is_flag=True, help="Print token ids instead of decoded tokens (no tokenizer needed).")
@click.option("--top", default=5, show_default=True, help="How many of the teacher's top tokens to show per row.")
@reports_user_errors
def cache_show_cmd(path: str, sample: str, pos: str | None, tokenizer: str | None, raw_ids: bool, top: int) -> None:
    """Table of SAMPLE's rows (SAMPLE: a sample id, or an index into the cache): position t, the actual next
    token, the probability and rank the teacher gave it, tail mass, and the teacher's top tokens."""
    from cache_schema.inspect import show_sample

    click.echo(show_sample(path, sample, _parse_pos(pos), tokenizer, top=top, raw_ids=raw_ids))


@cache.command("stats", short_help="Entropy, top-1 and tail-mass statistics (and histograms).")
@click.argument("path")
@click.option("--plot", default=None, metavar="OUT.png", help="Also write histograms of the three quantities here.")
@click.option("--max-rows", default=2_000_000, show_default=True,
              help="Use at most this many rows (whole samples, spread evenly).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@reports_user_errors
def cache_stats_cmd(path: str, plot: str | None, max_rows: int, as_json: bool) -> None:
    """Entropy (top-K plus a tail bucket, nats), top-1 probability and tail mass of the rows of the cache
    at PATH: mean and percentiles."""
    import json

    from cache_schema.inspect import cache_stats

    stats = cache_stats(path, plot, max_rows=max_rows)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"rows: {stats['rows']} (used {stats['rows_used']})")
    for key in ("entropy", "top1_mass", "tail_mass"):
        click.echo(f"{key:>10}: {_format(stats[key])}")
    if plot:
        click.echo(f"plot written to {plot}")


if __name__ == "__main__":  # torchrun runs `-m hyperdistill.cli train-worker ...`
    main()
