"""`cache` command group: inspect, verify, show, stats. The top-level CLI adds it as a subgroup
(`hyperdistill cache ...`). Exit codes: 0 fine, 1 verify found problems, 2 bad input (`error: ...`)."""

from __future__ import annotations

import json
import sys

import click

from cache_schema.inspect import cache_stats, inspect_cache, show_sample
from cache_schema.manifest import load_manifest_ids
from cache_schema.verify import verify_cache
from common.errors import UserError, reports_user_errors


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


@click.group("cache")
def cache() -> None:
    """Inspect, verify and look into a logit cache (a local path or an fsspec URL)."""


@cache.command("inspect", short_help="Summarise a cache: teacher, counts, parts, bytes per row.")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@reports_user_errors
def inspect_cmd(path: str, as_json: bool) -> None:
    """Teacher, rows kind (top-K or sampled: draws, support, tail-draw fraction), K, encoding, samples /
    tokens / rows, parts complete, bytes on disk, bytes per row, entries (distinct ids) per row and
    compression ratio of the cache at PATH."""
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
def verify_cmd(path: str, manifest: str | None, shards: tuple[int, ...]) -> None:
    """Read back every part and sample of the cache at PATH and check checksums, values, rank order, ids,
    positions and offsets. Prints each problem; exits 1 if there is any, 0 if the cache is clean."""
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
def show_cmd(path: str, sample: str, pos: str | None, tokenizer: str | None, raw_ids: bool, top: int) -> None:
    """Table of SAMPLE's rows (SAMPLE: a sample id, or an index into the cache): position t, the actual next
    token, the probability and rank the teacher gave it, tail mass, and the teacher's top tokens."""
    click.echo(show_sample(path, sample, _parse_pos(pos), tokenizer, top=top, raw_ids=raw_ids))


@cache.command("stats", short_help="Entropy, top-1 and tail-mass statistics (and histograms).")
@click.argument("path")
@click.option("--plot", default=None, metavar="OUT.png", help="Also write histograms of the three quantities here.")
@click.option("--max-rows", default=2_000_000, show_default=True,
              help="Use at most this many rows (whole samples, spread evenly).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@reports_user_errors
def stats_cmd(path: str, plot: str | None, max_rows: int, as_json: bool) -> None:
    """Entropy (top-K plus a tail bucket, nats), top-1 probability and tail mass of the rows of the cache
    at PATH: mean and percentiles."""
    stats = cache_stats(path, plot, max_rows=max_rows)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"rows: {stats['rows']} (used {stats['rows_used']})")
    for key in ("entropy", "top1_mass", "tail_mass"):
        click.echo(f"{key:>10}: {_format(stats[key])}")
    if plot:
        click.echo(f"plot written to {plot}")
