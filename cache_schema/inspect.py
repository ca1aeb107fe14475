"""Looking into a cache: `inspect_cache` (what it holds and what it costs on disk), `show_sample` (one
sample's rows as a table of decoded tokens) and `cache_stats` (entropy / top-1 / tail distributions)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr

from cache_schema.format import (
    DRAW_COUNTS, ID_TABLE, PARTS_GROUP, ROW_OFFSETS, SAMPLE_IDS, TOPK_COUNTS, TOPK_IDS, TOPK_LOGMASS, TOPK_LOGPROBS,
    part_path,
)
from cache_schema.metadata import PartMeta
from cache_schema.reader import CacheReader
from cache_schema.storage import CacheLocation, open_root, part_status
from common.errors import UserError

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def inspect_cache(path: str, *, storage_options: dict | None = None) -> dict[str, Any]:
    """Summary of a cache. Counts and sizes per row cover complete parts only: `bytes_per_row` = all their
    files / stored rows, `topk_bytes_per_row` = the top-K arrays only (topk_ids, topk_logprobs and, where the
    layout has them, topk_counts, topk_logmass and id_table); `entries_per_row` = stored top-K entries / rows (K unless
    mass-adaptive; for sampled rows the mean distinct ids per row); `decoded_bytes` = their
    numeric arrays once decompressed (stored dtypes), `compression_ratio` = decoded_bytes / those arrays'
    bytes on disk. `bytes_on_disk` is the whole store, incomplete parts included. `rows_kind` is 'topk' or
    'sampled'; sampled caches add `draws`, `support` and `tail_draw_fraction` (unnamed draws, outside the engine's
    top-K / all draws)."""
    location = CacheLocation(path, storage_options)
    root, meta = open_root(location)
    statuses = {s: part_status(root, s) for s in range(meta.num_shards)}
    totals = {"samples": 0, "tokens": 0, "prompt_tokens": 0, "rows": 0}
    decoded = entries = drawn = 0
    for shard, status in statuses.items():
        if status != "complete":
            continue
        group = zarr.open_group(root.store, path=part_path(shard), mode="r")
        pm = PartMeta.from_dict(dict(group.attrs), where=f"cache {location.path} part {shard:05d}")
        totals["samples"] += pm.n_samples
        totals["tokens"] += pm.n_tokens
        totals["prompt_tokens"] += pm.n_prompt_tokens
        totals["rows"] += pm.n_rows
        arrays = dict(group.arrays())
        decoded += sum(a.nbytes for name, a in arrays.items() if name != SAMPLE_IDS)
        entries += arrays[TOPK_IDS].size
        if meta.sampled is not None:
            drawn += int(arrays[DRAW_COUNTS][:].sum(dtype=np.int64))
    sizes = location.file_sizes()
    complete = {f"{s:05d}" for s, v in statuses.items() if v == "complete"}
    by_array: dict[str, int] = {}
    complete_bytes = 0
    for key, size in sizes.items():
        parts = key.split("/")  # parts/<shard>/<array>/c/... or parts/<shard>/zarr.json
        if len(parts) >= 3 and parts[0] == PARTS_GROUP and parts[1] in complete:
            complete_bytes += size
            if len(parts) >= 4 and parts[2] != SAMPLE_IDS:
                by_array[parts[2]] = by_array.get(parts[2], 0) + size
    rows = totals["rows"]
    topk = sum(by_array.get(name, 0)
               for name in (TOPK_IDS, TOPK_LOGPROBS, TOPK_COUNTS, TOPK_LOGMASS, ID_TABLE, DRAW_COUNTS))
    sampling = meta.sampled
    kind: dict[str, Any] = {"rows_kind": "topk" if sampling is None else "sampled"}
    if sampling is not None:
        kind.update(draws=sampling.draws, support=sampling.support,
                    tail_draw_fraction=1 - drawn / (rows * sampling.draws) if rows else None)
    return {
        "path": location.path,
        "schema_version": meta.schema_version,
        "teacher": meta.teacher.to_dict(),
        "tokenizer": meta.tokenizer.name,
        **kind,
        "k": meta.k,
        "encoding": meta.encoding,
        "mass_epsilon": meta.mass_epsilon,
        "positions": meta.positions,
        "vocab_size": meta.vocab_size,
        **totals,
        "parts_complete": sum(v == "complete" for v in statuses.values()),
        "parts_total": meta.num_shards,
        "parts_incomplete": [s for s, v in statuses.items() if v == "incomplete"],
        "parts_missing": [s for s, v in statuses.items() if v == "missing"],
        "bytes_on_disk": sum(sizes.values()),
        "bytes_by_array": dict(sorted(by_array.items())),
        "bytes_per_row": complete_bytes / rows if rows else None,
        "topk_bytes_per_row": topk / rows if rows else None,
        "entries_per_row": entries / rows if rows else None,
        "decoded_bytes": decoded,
        "compression_ratio": decoded / sum(by_array.values()) if by_array else None,
    }


def _load_tokenizer(tokenizer: Any, reader: CacheReader) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    source = tokenizer or reader.meta.tokenizer.path
    if not source:
        raise UserError(f"cache {reader.path}: its metadata names no tokenizer path; pass one (--tokenizer PATH)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {source}: cannot load it locally ({str(e).splitlines()[0]})") from None


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return repr(tokenizer.decode([int(token_id)]))


def _resolve_sample(reader: CacheReader, sample: str | int) -> int:
    if isinstance(sample, str):
        try:
            return reader.index_of(sample)
        except KeyError:
            if not sample.lstrip("-").isdigit():
                raise UserError(f"cache {reader.path}: no sample with id {sample!r}") from None
    index = int(sample)
    if not -len(reader) <= index < len(reader):
        raise UserError(f"cache {reader.path}: no sample with id or index {sample!r} ({len(reader)} samples)")
    return index % len(reader)


def show_sample(path: str, sample: str | int, pos: tuple[int, int] | None = None, tokenizer: Any = None, *,
                top: int = 5, max_rows: int = 20, raw_ids: bool = False, storage_options: dict | None = None) -> str:
    """A text table of one sample's rows: position t, the actual token t+1, the probability and rank the
    teacher gave it, the tail mass, and the teacher's top tokens with probabilities.

    `sample`: a sample id, or an index (an int, or a string of digits that is not an id).
    `pos=(a, b)`: rows with a <= t < b (default: the first `max_rows`).
    `tokenizer`: a tokenizer object, a local path, or None for the path in the cache's metadata;
    `raw_ids=True` prints ids and loads no tokenizer."""
    reader = CacheReader(path, storage_options=storage_options)
    index = _resolve_sample(reader, sample)
    s = reader[index]
    shard, _ = reader.locate(index)
    tok = None if raw_ids else _load_tokenizer(tokenizer, reader)
    if pos is None:
        rows = np.arange(min(max_rows, len(s.positions)))
    else:
        a, b = pos
        rows = np.flatnonzero((s.positions >= a) & (s.positions < b))
    sampling = reader.meta.sampled
    top = min(top, reader.meta.row_width)
    if sampling is None:
        kind = f"K={reader.meta.k}"
        header = f"{'t':>6}  {'next token':<22} {'p(next)':>8} {'rank':>5} {'tail':>7}  top-{top}"
    else:
        kind = f"sampled rows: N={sampling.draws} draws, support {sampling.support}"
        header = (f"{'t':>6}  {'next token':<22} {'w(next)':>8} {'rank':>5} {'tail':>7}  "
                  f"{top} most drawn: count x, w = count/N")
    lines = [
        f"sample {s.sample_id!r} (index {index}, part {shard:05d}): {len(s.input_ids)} tokens, "
        f"{len(s.prompt_ids)} prompt tokens, {len(s.positions)} rows, {kind}",
        "row at t = the teacher's distribution over token t+1; 'p(next)' and 'rank' are for the actual token t+1"
        if sampling is None else
        "row at t = N draws from the teacher's distribution over token t+1; 'w(next)' = the actual token's draws / N,"
        " 'tail' = draws outside the top-K / N",
        header,
    ]
    for r in rows:
        t = int(s.positions[r])
        nxt = int(s.input_ids[t + 1])
        n = int(s.topk_counts[r])
        ids, probs = s.topk_ids[r, :n], np.exp(s.topk_logprobs[r, :n])
        hit = np.flatnonzero(ids == nxt)
        if sampling is None:
            p_next, rank = (f"{probs[hit[0]]:.4f}", str(int(hit[0]) + 1)) if hit.size else ("tail", ">K")
            tops = "  ".join(f"{_token_text(tok, ids[i])} {probs[i]:.3f}" for i in range(min(top, n)))
        else:
            p_next, rank = (f"{probs[hit[0]]:.4f}", str(int(hit[0]) + 1)) if hit.size else ("0", "-")
            drawn = np.rint(probs * sampling.draws).astype(int)  # w = count / N exactly, up to float32
            tops = "  ".join(f"{_token_text(tok, ids[i])} {drawn[i]}x w={probs[i]:.3f}" for i in range(min(top, n)))
        lines.append(f"{t:>6}  {_token_text(tok, nxt):<22} {p_next:>8} {rank:>5} {s.tail_mass[r]:>7.4f}  {tops}")
    more = pos is None and len(rows) < len(s.positions)
    hint = "; use pos=(a, b) / --pos A:B for others" if more else ""
    lines.append(f"{len(rows)} of {len(s.positions)} rows shown{hint}")
    return "\n".join(lines)


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": math.nan, **{f"p{q}": math.nan for q in PERCENTILES}}
    out = {"mean": float(values.mean())}
    out.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))})
    return out


def cache_stats(path: str, plot: str | None = None, *, max_rows: int = 2_000_000,
                storage_options: dict | None = None) -> dict[str, Any]:
    """Per-row entropy (nats, over the row's entries plus one tail bucket), top-1 probability and tail mass:
    mean and percentiles over the rows of the complete parts. Beyond `max_rows`, whole samples spread evenly
    over the cache are used (`rows_used` says how many). `plot`: write a PNG with the three histograms."""
    reader = CacheReader(path, storage_options=storage_options)
    rows_per_sample = np.concatenate([np.diff(p.offsets[ROW_OFFSETS]) for p in reader.parts] or [np.empty(0, int)])
    total = int(rows_per_sample.sum())
    chosen = np.arange(len(reader))
    if total > max_rows:
        keep = max(1, round(len(reader) * max_rows / total))
        chosen = np.unique(np.linspace(0, len(reader) - 1, keep).round().astype(int))
    entropy, top1, tail = [], [], []
    for i in chosen:
        s = reader[int(i)]
        p = np.exp(s.topk_logprobs)  # exactly 0 on padding entries
        t = s.tail_mass
        with np.errstate(divide="ignore", invalid="ignore"):
            tail_term = np.where(t > 0, t * np.log(t), 0.0)
        entropy.append(-(p * s.topk_logprobs).sum(axis=1) - tail_term)
        top1.append(p[:, 0])
        tail.append(t)
    entropy_v, top1_v, tail_v = (np.concatenate(xs).astype(np.float64) if xs else np.empty(0)
                                 for xs in (entropy, top1, tail))
    if plot:
        _plot(plot, reader.path, {"entropy (nats)": entropy_v, "top-1 probability": top1_v, "tail mass": tail_v})
    return {
        "rows": total,
        "rows_used": int(entropy_v.size),
        "entropy": _summary(entropy_v),
        "top1_mass": _summary(top1_v),
        "tail_mass": _summary(tail_v),
        "plot": plot,
    }


def _plot(out: str, title: str, series: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6))
    for ax, (name, values) in zip(axes, series.items()):
        ax.hist(values, bins=100)
        ax.set_xlabel(name)
        ax.set_ylabel("rows")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise UserError(f"plot {out}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)
