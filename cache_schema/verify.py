"""`verify_cache`: read every part and sample back and check every promise of the format. Problems are
collected (never raised), each naming its part, sample and check, so one run lists everything wrong.

Checks, by name:
  part_missing, part_incomplete   every shard 0..num_shards-1 has a complete part
  part                            part metadata parses; arrays exist with the right dtype and K;
                                  k/encoding agree with the root; offsets start at 0, never decrease and end
                                  at the array lengths; the part's counts match its arrays
  chunks_missing                  every chunk of every array exists (they are all written, even empty ones)
  read                            a sample's chunks decompress and pass their crc32c
  checksum                        the sample's checksum matches its stored arrays
  finite, logprob_positive        decoded log-probs are finite and <= 0
  rank_order                      log-probs non-increasing along K
  prob_sum                        [fp16 at fixed K] sum of exp(log-prob - encoding error bound) <= 1 + PROB_SUM_TOL
  id_range                        input, prompt and top-K ids < vocab_size
  duplicate_ids                   no token id twice within a top-K row
  counts                          [mass-adaptive] every row has 1..K entries and they add up to the stored ones
  range                           [quantised] codes within the encoding's range (log-prob >= its min_value)
  tie_order                       [quantised] entries with equal codes are in ascending id-table order
  logmass                         [all others] the stored row mass is finite, <= 0, and agrees with the row's
                                  stored log-probs within their rounding bounds
  mass_epsilon                    [mass-adaptive] a row with fewer than K entries covers >= 1 - eps, and no
                                  row keeps more entries than that needs (both up to the rounding bounds)
  sampled_counts                  [sampled] every row has 1..N distinct ids (0..N with support top-K) and
                                  they add up to the stored ids and draw counts
  draw_counts                     [sampled] draw counts >= 1, summing to <= N per row (== N with support
                                  full: every draw is a token)
  draw_order                      [sampled] entries in descending count order, ties by ascending id
  id_range, duplicate_ids         [sampled] drawn ids < vocab_size, distinct within a row
                                  (sampled rows skip the log-prob checks: they store counts)
  positions                       positions == stored_positions(loss_mask, positions mode)
  duplicate_sample                a sample id in two places
  manifest_missing                a sample the manifest lists for a shard is not in that shard's part
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from cache_schema.encoding import get_encoding
from cache_schema.encoding import Encoding
from cache_schema.format import (
    DRAW_COUNTS, INPUT_IDS, LOSS_MASK, POSITIONS, PROMPT_IDS, TOPK_COUNTS, TOPK_IDS, TOPK_LOGMASS, TOPK_LOGPROBS,
    part_arrays, sample_checksum, stored_positions,
)
from cache_schema.metadata import RootMeta
from cache_schema.reader import DEFAULT_CACHE_BYTES, CacheCorrupt, PartReader, ChunkLRU
from cache_schema.row_checks import PROB_SUM_TOL, describe_rows, row_violations
from cache_schema.storage import CacheLocation, open_root, part_status
from cache_schema.topk_rows import IdTable, decode_rows
from common.errors import UserError


@dataclass(frozen=True)
class Problem:
    check: str
    detail: str
    shard: int | None = None
    sample_id: str | None = None

    def __str__(self) -> str:
        where = []
        if self.shard is not None:
            where.append(f"part {self.shard:05d}")
        if self.sample_id is not None:
            where.append(f"sample {self.sample_id!r}")
        return f"{' '.join(where) or 'cache'}: {self.check}: {self.detail}"


@dataclass
class VerifyReport:
    path: str
    parts_total: int = 0
    parts_complete: int = 0
    samples: int = 0
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return (f"cache {self.path}: {self.parts_complete}/{self.parts_total} parts complete, {self.samples} samples, "
                f"{self.rows} rows checked: {verdict}")


def check_sample(arrays: dict[str, np.ndarray], sample_id: str, stored_checksum: int, meta: RootMeta,
                 id_table: IdTable | None = None) -> list[tuple[str, str]]:
    """(check, detail) for everything wrong with one sample's stored arrays (`id_table`: its part's, with the
    quantised encodings)."""
    out: list[tuple[str, str]] = []
    layout = part_arrays(meta)
    salt = id_table.digest() if id_table is not None else b""
    if sample_checksum(sample_id, arrays, layout.appended, sha256=layout.sha256_checksums,
                       salt=salt) != int(stored_checksum):
        out.append(("checksum", "the stored arrays do not match the sample's checksum"))
    enc = get_encoding(meta.encoding)
    positions = arrays[POSITIONS]
    if layout.sampled:
        out.extend(_sampled_rows(arrays, positions, meta))
    elif layout.exact_mass:
        out.extend(_exact_mass_rows(arrays, positions, meta, enc, id_table))
    else:
        lp = enc.decode(arrays[TOPK_LOGPROBS])
        for check, bad, what in row_violations(arrays[TOPK_IDS], lp, meta.vocab_size,
                                               logprob_slack=enc.error_bound(lp)):
            out.append((check, describe_rows(bad, positions, what)))
    for name in (INPUT_IDS, PROMPT_IDS):
        if arrays[name].size and int(arrays[name].max()) >= meta.vocab_size:
            out.append(("id_range", f"{name} holds ids >= vocab_size {meta.vocab_size}"))
    expected = stored_positions(arrays[LOSS_MASK], meta.positions)
    if not np.array_equal(positions, expected):
        out.append(("positions", f"{len(positions)} rows at positions that differ from stored_positions(loss_mask, "
                                 f"{meta.positions!r}) ({len(expected)} expected)"))
    return out


def _sampled_rows(arrays: dict[str, np.ndarray], positions: np.ndarray, meta: RootMeta) -> list[tuple[str, str]]:
    """Row checks for sampled rows (distinct ids with draw counts)."""
    n, full = meta.sampled.draws, meta.sampled.support_k is None
    counts = arrays[TOPK_COUNTS].astype(np.int64)
    ids, dc = arrays[TOPK_IDS].astype(np.int64), arrays[DRAW_COUNTS].astype(np.int64)
    low = 1 if full else 0
    if len(ids) != int(counts.sum()) or len(dc) != len(ids):
        return [("sampled_counts", f"{len(ids)} ids and {len(dc)} draw counts stored for rows of "
                                   f"{int(counts.sum())} entries")]
    row = np.repeat(np.arange(len(counts)), counts)  # (E,) the row of each entry
    drawn = np.bincount(row, weights=dc, minlength=len(counts))
    same_row = row[1:] == row[:-1]
    by_id = np.lexsort((ids, row))
    checks = [
        ("sampled_counts", (counts < low) | (counts > n), f"rows with a number of distinct ids outside {low}..{n}"),
        ("draw_counts", np.bincount(row, weights=dc < 1, minlength=len(counts)) > 0, "draw counts below 1"),
        ("draw_counts", drawn != n if full else drawn > n,
         f"draw counts summing {'to other than' if full else 'above'} N={n}"),
        ("draw_order", np.bincount(row[1:], weights=same_row & ((dc[1:] > dc[:-1]) | ((dc[1:] == dc[:-1])
                                   & (ids[1:] <= ids[:-1]))), minlength=len(counts)) > 0,
         "entries not in descending count order (ties by ascending id)"),
        ("id_range", np.bincount(row, weights=ids >= meta.vocab_size, minlength=len(counts)) > 0,
         f"drawn ids >= vocab_size {meta.vocab_size}"),
        ("duplicate_ids", np.bincount(row[by_id][1:], weights=(row[by_id][1:] == row[by_id][:-1])
                                      & (ids[by_id][1:] == ids[by_id][:-1]), minlength=len(counts)) > 0,
         "a token id twice in a row"),
    ]
    return [(name, describe_rows(bad, positions, what)) for name, bad, what in checks if bad.any()]


def _exact_mass_rows(arrays: dict[str, np.ndarray], positions: np.ndarray, meta: RootMeta, enc: Encoding,
                     id_table: IdTable | None) -> list[tuple[str, str]]:
    """Row checks for the layouts with topk_logmass (quantised encodings, mass-adaptive K)."""
    try:
        rows = decode_rows(arrays, enc, meta.k, meta.vocab_size, id_table=id_table, detail=True)
    except ValueError as e:
        return [("counts", str(e))]
    valid = rows.valid()
    ids, raw, lm = rows.ids, rows.raw, arrays[TOPK_LOGMASS].astype(np.float64)
    half = np.where(valid, enc.bin_halfwidth(rows.codes), 0.0)
    k = meta.k
    with np.errstate(invalid="ignore", over="ignore"):
        checks = [
            ("id_range", (valid & ((ids < 0) | (ids >= meta.vocab_size))).any(axis=1),
             f"top-K ids outside [0, vocab_size {meta.vocab_size})"),
            ("duplicate_ids",  # padding gets distinct negative stand-ins
             (np.diff(np.sort(np.where(valid, ids, -1 - np.arange(k)), axis=1), axis=1) == 0).any(axis=1),
             "a token id twice in a row"),
            ("logmass", ~np.isfinite(lm) | (lm > 0), "a stored row mass that is not finite or above 1"),
        ]
        if enc.delta_coded:
            same_code = np.diff(rows.codes, axis=1) == 0
            checks += [
                ("range", (valid & (rows.codes > enc.max_code)).any(axis=1),
                 f"codes beyond the {enc.name} encoding's range"),
                ("tie_order", (valid[:, 1:] & same_code & (np.diff(rows.symbols, axis=1) <= 0)).any(axis=1),
                 "entries with equal codes not in ascending id-table order"),
            ]
        else:
            real = np.where(valid, raw, -np.inf)
            checks += [
                ("finite", (valid & ~np.isfinite(raw)).any(axis=1), "log-probs not finite"),
                ("logprob_positive", (real > 0).any(axis=1), "log-probs above 0"),
                ("rank_order", (valid[:, 1:] & (np.diff(real, axis=1) > 0)).any(axis=1),
                 "log-probs not in rank order (non-increasing along K)"),
            ]
        # The stored mass is the log-sum-exp of the teacher's values, each within `half` of its decoded value,
        # clamped at 0 when float error put the teacher's sum above 1 (the writer allows 1 + PROB_SUM_TOL).
        slack = half.max(axis=1) + 1e-5 + np.abs(lm) * 1e-6 + np.where(lm == 0, np.log1p(PROB_SUM_TOL), 0.0)
        checks.append(("logmass", ~(np.abs(rows.shift) <= slack),
                       "a stored row mass that disagrees with the row's log-probs beyond the encoding's bound"))
        if meta.mass_epsilon is not None:
            target = 1.0 - meta.mass_epsilon
            short = rows.counts < k
            # The teacher's mass of the first n-1 entries is at least that of the decoded values less `half`.
            lower = np.exp(raw.astype(np.float64) - half)
            before_last = np.where(np.arange(k) < rows.counts[:, None] - 1, lower, 0.0).sum(axis=1)
            checks += [
                ("mass_epsilon", short & (np.exp(lm) < target * (1 - 1e-6)),
                 f"rows with fewer than K entries that hold less than 1 - mass_epsilon = {target:g}"),
                ("mass_epsilon", before_last >= target * (1 + 1e-6),
                 f"rows keeping more entries than needed to hold 1 - mass_epsilon = {target:g}"),
            ]
    return [(name, describe_rows(bad, positions, what)) for name, bad, what in checks if bad.any()]


def verify_cache(path: str, manifest_ids: dict[int, list[str]] | None = None, *, storage_options: dict | None = None,
                 shards: list[int] | None = None) -> VerifyReport:
    """Check the whole cache (or only `shards`); see the module docstring for the checks. UserError only when
    there is no readable cache root at `path`."""
    location = CacheLocation(path, storage_options)
    root, meta = open_root(location)
    where = f"cache {location.path}"
    selected = range(meta.num_shards) if shards is None else shards
    report = VerifyReport(path=location.path, parts_total=meta.num_shards)
    problems = report.problems
    seen: dict[str, int] = {}
    lru = ChunkLRU(DEFAULT_CACHE_BYTES)
    for shard in selected:
        if not 0 <= shard < meta.num_shards:
            raise UserError(f"{where}: shard {shard} out of range 0..{meta.num_shards - 1}")
        status = part_status(root, shard)
        if status != "complete":
            problems.append(Problem(f"part_{status}", f"the part is {status}", shard))
            continue
        report.parts_complete += 1
        try:
            part = PartReader(root, shard, meta, where, lru)
        except CacheCorrupt as e:
            problems.append(Problem("part", e.detail, shard))
            continue
        problems.extend(_missing_chunks(part, shard))
        for j, sid in enumerate(part.sample_ids):
            if sid in seen:
                problems.append(Problem("duplicate_sample", f"also in part {seen[sid]:05d}", shard, sid))
            seen.setdefault(sid, shard)
            report.samples += 1
            try:
                arrays = part.read_stored(j)
            except CacheCorrupt as e:
                problems.append(Problem("read", e.detail, shard, sid))
                continue
            report.rows += len(arrays[POSITIONS])
            problems.extend(Problem(c, d, shard, sid)
                            for c, d in check_sample(arrays, sid, part.checksums[j], meta, part.id_table))
        if manifest_ids is not None:
            present = set(part.sample_ids)
            missing = [sid for sid in manifest_ids.get(shard, []) if sid not in present]
            problems.extend(Problem("manifest_missing", "listed in the manifest, not in the part", shard, sid)
                            for sid in missing)
    if manifest_ids is not None:
        for shard in sorted(set(manifest_ids) - set(range(meta.num_shards))):
            problems.append(Problem("manifest_missing", f"the manifest lists {len(manifest_ids[shard])} sample(s) for "
                                    f"shard {shard} but the cache has {meta.num_shards} shards"))
    return report


def _missing_chunks(part: PartReader, shard: int) -> list[Problem]:
    out = []
    for name, array in part.arrays.items():
        try:
            present = array.nchunks_initialized
        except (OSError, ValueError, zarr.errors.BaseZarrError) as e:
            out.append(Problem("chunks_missing", f"cannot list {name}'s chunks ({e})", shard))
            continue
        if present < array.nchunks:
            out.append(Problem("chunks_missing", f"{name} has {present} of {array.nchunks} chunks", shard))
    return out
