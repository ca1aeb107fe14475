"""Size, fidelity and speed of every log-prob encoding and mass-adaptive epsilon, as a markdown table:

    python -m benchmarks.encodings --rows 200000 [--teacher-cache runs/demo/cache.zarr]

Two sources, measured separately: synthetic Zipf-shaped rows (`cache_schema.synthetic`) and, when a cache of
real teacher output exists at --teacher-cache (fixed K; skipped with a message otherwise), its rows, taken as
the truth exactly as that cache decodes them. For each (encoding, epsilon) the rows are written as a
one-part cache in a temporary folder with the real writer and read back with the real reader.

Columns:
- entries/row: top-K entries stored per row (K unless mass-adaptive).
- top-K B/row: bytes on disk of topk_ids + topk_logprobs (+ topk_counts, topk_logmass, id_table) per row;
  all B/row: every file of the part (tokens, positions, offsets too) per row.
- KL mean / max (nats): KL(true || decoded) per row over the K + 1 buckets the loss sees: the row's stored
  ids plus one tail bucket. true = the teacher's probabilities of those ids and 1 - their sum; decoded = what
  the reader hands to training, its tail floored at 1e-10 like the loss (stage2_student.losses.TAIL_FLOOR).
  At fixed K the buckets are the true top-K plus the tail. With mass-adaptive K the dropped entries are
  inside the tail bucket on both sides, so what dropping them costs is the separate column:
- dropped: mean probability the teacher gave the entries mass-adaptive K dropped (<= epsilon by design).
- max err: largest |decoded - true| log-prob over the real entries, and the encoding's worst case.
- write us/row: PartWriter.add + finish (validation, encoding, checksums, compression, writes), per row.
- read rows/s: CacheReader[i] over the samples in random order, one process, fresh reader (chunk LRU
  64 MiB), including decompression, decoding, renormalisation and padding to [R, K].
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import click
import numpy as np

from cache_schema.encoding import ENCODINGS, QuantisedLogEncoding, get_encoding
from cache_schema.format import SampleRows
from cache_schema.inspect import inspect_cache
from cache_schema.reader import CacheReader
from cache_schema.synthetic import example_root_meta, synthetic_samples
from cache_schema.writer import CacheStore
from common.errors import UserError

TAIL_FLOOR = 1e-10  # as stage2_student.losses.TAIL_FLOOR (cache_schema imports nothing from the stages)
DEFAULT_EPSILONS = (None, 1e-2, 1e-3, 1e-4)


@dataclass
class Result:
    source: str
    encoding: str
    epsilon: float | None
    entries_per_row: float
    topk_bytes_per_row: float
    bytes_per_row: float
    kl_mean: float
    kl_max: float
    dropped_mean: float
    max_err: float
    write_us_per_row: float
    read_rows_per_s: float


def teacher_samples(path: str, rows: int) -> tuple[list[SampleRows], int, int]:
    """Up to `rows` rows of whole samples from a cache of real teacher output, as the writer takes them
    (their decoded values are the truth here), plus the cache's K and vocabulary size."""
    reader = CacheReader(path)
    samples, total = [], 0
    for i in range(len(reader)):
        s = reader[i]
        if (s.topk_counts < reader.meta.k).any():
            raise UserError(f"cache {path}: mass-adaptive rows; the benchmark needs a cache with all K entries")
        samples.append(SampleRows(sample_id=s.sample_id, input_ids=s.input_ids, loss_mask=s.loss_mask,
                                  prompt_ids=s.prompt_ids, positions=s.positions, topk_ids=s.topk_ids,
                                  topk_logprobs=s.topk_logprobs))
        total += len(s.positions)
        if total >= rows:
            break
    return samples, reader.meta.k, reader.meta.vocab_size


def row_fidelity(true_ids: np.ndarray, true_lp: np.ndarray, got_ids: np.ndarray, got_lp: np.ndarray,
                 counts: np.ndarray, got_tail: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: KL over the stored entries + tail (see the module docstring), dropped teacher mass, and the
    largest |decoded - true| log-prob. The stored entries of a row are the teacher's first `counts`, maybe
    reordered among ties, so both sides are compared sorted by id."""
    k = true_ids.shape[1]
    kept = np.arange(k) < counts[:, None]
    big = np.iinfo(np.int64).max
    t_order = np.argsort(np.where(kept, true_ids, big), axis=1, kind="stable")
    g_order = np.argsort(np.where(kept, got_ids, big), axis=1, kind="stable")
    t_ids = np.take_along_axis(true_ids, t_order, axis=1)
    g_ids = np.take_along_axis(got_ids, g_order, axis=1)
    if not (np.where(kept, t_ids, 0) == np.where(kept, g_ids, 0)).all():
        raise AssertionError("the decoded rows do not hold the teacher's top entries")
    x = np.take_along_axis(true_lp.astype(np.float64), t_order, axis=1)
    d = np.take_along_axis(got_lp.astype(np.float64), g_order, axis=1)
    p = np.where(kept, np.exp(x), 0.0)
    p_all = np.exp(true_lp.astype(np.float64))
    p_tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_tail = np.maximum(got_tail.astype(np.float64), TAIL_FLOOR)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(kept, p * (x - d), 0.0).sum(axis=1) + np.where(p_tail > 0, p_tail * np.log(p_tail / q_tail), 0.0)
    dropped = np.where(kept, 0.0, p_all).sum(axis=1)
    err = np.where(kept, np.abs(x - d), 0.0).max(axis=1)
    return kl, dropped, err


def measure(source: str, samples: list[SampleRows], k: int, vocab_size: int, encoding: str,
            epsilon: float | None, workdir: str, seed: int = 0) -> Result:
    path = os.path.join(workdir, f"{source}-{encoding}-{epsilon}.zarr")
    meta = example_root_meta(k=k, vocab_size=vocab_size, num_shards=1, encoding=encoding, mass_epsilon=epsilon)
    store = CacheStore.create_or_open(path, meta)
    rows = sum(len(s.positions) for s in samples)
    t0 = time.perf_counter()
    with store.open_part_writer(0, owner="bench") as writer:
        for s in samples:
            writer.add(s)
    write_s = time.perf_counter() - t0
    info = inspect_cache(path)

    reader = CacheReader(path)
    order = np.random.default_rng(seed).permutation(len(samples))
    t0 = time.perf_counter()
    got = {int(i): reader[int(i)] for i in order}
    read_s = time.perf_counter() - t0

    kl, dropped, err = (np.concatenate(parts) for parts in zip(*(
        row_fidelity(np.asarray(s.topk_ids, np.int64), np.asarray(s.topk_logprobs), got[i].topk_ids,
                     got[i].topk_logprobs, got[i].topk_counts, got[i].tail_mass)
        for i, s in enumerate(samples) if len(s.positions))))
    return Result(source=source, encoding=encoding, epsilon=epsilon, entries_per_row=info["entries_per_row"],
                  topk_bytes_per_row=info["topk_bytes_per_row"], bytes_per_row=info["bytes_per_row"],
                  kl_mean=float(kl.mean()), kl_max=float(kl.max()), dropped_mean=float(dropped.mean()),
                  max_err=float(err.max()), write_us_per_row=write_s / rows * 1e6, read_rows_per_s=rows / read_s)


def worst_case(encoding: str, epsilon: float | None) -> str:
    """The stated worst-case error of decoded log-probs, as text: twice the largest rounding error for
    renormalised rows (see cache_schema.encoding), fp16's relative rounding otherwise."""
    enc = get_encoding(encoding)
    if isinstance(enc, QuantisedLogEncoding):
        return f"{2 * enc.worst_rounding:.3g}"
    return "x·2^-11" if epsilon is None else "x·2^-11 + shift"


def markdown(results: list[Result]) -> str:
    head = ("| source | encoding | ε | entries/row | top-K B/row | all B/row | KL mean | KL max | dropped | "
            "max err (bound) | write µs/row | read rows/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        eps = "-" if r.epsilon is None else f"{r.epsilon:g}"
        lines.append(
            f"| {r.source} | {r.encoding} | {eps} | {r.entries_per_row:.1f} | {r.topk_bytes_per_row:.1f} | "
            f"{r.bytes_per_row:.1f} | {r.kl_mean:.2e} | {r.kl_max:.2e} | {r.dropped_mean:.1e} | "
            f"{r.max_err:.3g} ({worst_case(r.encoding, r.epsilon)}) | {r.write_us_per_row:.2f} | "
            f"{r.read_rows_per_s:,.0f} |")
    return "\n".join(lines)


def _epsilons(text: str) -> tuple[float | None, ...]:
    try:
        return tuple(None if e.strip().lower() in ("none", "-") else float(e) for e in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a comma-separated list of numbers or 'none'") from None


@click.command()
@click.option("--rows", default=200_000, show_default=True, help="Rows per source.")
@click.option("--k", default=128, show_default=True, help="Top-K width of the synthetic rows.")
@click.option("--vocab-size", default=151_936, show_default=True, help="Vocabulary of the synthetic rows.")
@click.option("--teacher-cache", default="runs/demo/cache.zarr", show_default=True,
              help="A cache of real teacher output (fixed K) to take rows from; skipped if absent.")
@click.option("--encodings", default=",".join(ENCODINGS), show_default=True, help="Comma-separated encodings.")
@click.option("--epsilons", default="none,1e-2,1e-3,1e-4", show_default=True,
              help="Comma-separated mass_epsilon values ('none': all K).")
@click.option("--seed", default=0, show_default=True)
def main(rows: int, k: int, vocab_size: int, teacher_cache: str, encodings: str, epsilons: str, seed: int) -> None:
    """Print a markdown table of bytes per row, KL, dropped mass, error and speed per encoding and epsilon."""
    names = [e.strip() for e in encodings.split(",") if e.strip()]
    for name in names:
        get_encoding(name)
    eps_list = _epsilons(epsilons)
    sources = [("synthetic", synthetic_samples(rows, k, vocab_size, seed), k, vocab_size)]
    if os.path.exists(teacher_cache):
        sources.append(("teacher", *teacher_samples(teacher_cache, rows)))
    else:
        click.echo(f"no teacher cache at {teacher_cache}: measuring synthetic rows only", err=True)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for source, samples, src_k, src_vocab in sources:
            n_rows = sum(len(s.positions) for s in samples)
            click.echo(f"{source}: {len(samples)} samples, {n_rows} rows, K={src_k}", err=True)
            for name in names:
                for eps in eps_list:
                    results.append(measure(source, samples, src_k, src_vocab, name, eps, workdir, seed))
                    click.echo(f"  {name} eps={eps}: done", err=True)
    click.echo(markdown(results))


if __name__ == "__main__":
    main()
