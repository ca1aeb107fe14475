"""The `hyperdistill` command line: parse, load the config, call one function per command.

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


class LazyGroup(click.Group):
    """A group whose subcommands from heavy modules (torch, zarr) are imported only when one of them runs:
    `hyperdistill --help` lists them with the short help given here (a test checks it matches theirs)."""

    LAZY = {
        "cache": ("cache_schema.cli", "cache",
                  "Inspect, verify and look into a logit cache (a local path or an fsspec URL)."),
        "export-lora": ("stage2_student.export", "export_lora_cmd",
                        "Run the trained hypernetwork on task prompts and write standard PEFT LoRA adapters."),
        "plan": ("hyperdistill.plan", "plan_cmd",
                 "Plan a run on paper: memory per GPU, work, cache size and hours per stage."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            import importlib

            module, attr, _ = self.LAZY[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from click.utils import make_default_short_help

        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))  # as click.Group lays it out
        rows = [(name, make_default_short_help(self.LAZY[name][2], limit) if name in self.LAZY
                 else self.commands[name].get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@reports_user_errors
def prepare_data_cmd(config_path: str, overrides: tuple[str, ...]) -> None:
    """Load, filter and render trajectories; write the manifest (ids, lengths, shard of each)."""
    from common.manifest import prepare_data
    from common.models import load_tokenizer

    cfg = _load(config_path, overrides)
    tokenizer = load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    summary = prepare_data(cfg, tokenizer)
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

    Resumes from the newest checkpoint in train.output_dir. For several nodes, call torchrun directly
    (see README: `torchrun --nnodes ... -m stage2_student.train`).
    """
    import subprocess

    _load(config_path, overrides)  # validate before launching processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stage2_student.train", "--config", config_path]  # fmt: skip
    for item in overrides:
        cmd += ["--set", item]
    sys.exit(subprocess.call(cmd))


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
    for key, value in count_hypernet_params(cfg.hyper, student).items():
        click.echo(f"{key:>28}: {value:,}" if isinstance(value, int) else f"{key:>28}: {value}")


