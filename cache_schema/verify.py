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
  prob_sum                        sum of exp(log-prob - encoding error bound) <= 1 + PROB_SUM_TOL
  id_range                        input, prompt and top-K ids < vocab_size
  duplicate_ids                   no token id twice within a top-K row
  positions                       positions == stored_positions(loss_mask, positions mode)
  duplicate_sample                a sample id in two places
  manifest_missing                a sample the manifest lists for a shard is not in that shard's part
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from cache_schema.encoding import get_encoding
from cache_schema.layout import (
    INPUT_IDS, LOSS_MASK, PROMPT_IDS, POSITIONS, TOPK_IDS, TOPK_LOGPROBS, RootMeta, describe_rows, row_violations,
    sample_checksum, stored_positions,
)
from cache_schema.reader import DEFAULT_CACHE_BYTES, CacheCorrupt, PartReader, ChunkLRU
from cache_schema.storage import CacheLocation, open_root, part_status
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


def load_manifest_ids(path: str | Path) -> dict[int, list[str]]:
    """Sample ids by shard from a JSONL manifest (one object per line with 'shard' and 'sample_id' or 'id')."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"manifest {p}: not found")
    ids: dict[int, list[str]] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"manifest {p} line {n}: not JSON ({e.msg})") from None
        sid = row.get("sample_id", row.get("id")) if isinstance(row, dict) else None
        shard = row.get("shard") if isinstance(row, dict) else None
        if not isinstance(sid, str) or not isinstance(shard, int) or isinstance(shard, bool):
            raise UserError(f"manifest {p} line {n}: needs a string 'sample_id' (or 'id') and an integer 'shard'")
        ids.setdefault(shard, []).append(sid)
    return ids


def check_sample(arrays: dict[str, np.ndarray], sample_id: str, stored_checksum: int,
                 meta: RootMeta) -> list[tuple[str, str]]:
    """(check, detail) for everything wrong with one sample's stored arrays."""
    out: list[tuple[str, str]] = []
    if sample_checksum(sample_id, arrays) != int(stored_checksum):
        out.append(("checksum", "the stored arrays do not match the sample's checksum"))
    enc = get_encoding(meta.encoding)
    positions = arrays[POSITIONS]
    lp = enc.decode(arrays[TOPK_LOGPROBS])
    for check, bad, what in row_violations(arrays[TOPK_IDS], lp, meta.vocab_size, logprob_slack=enc.error_bound(lp)):
        out.append((check, describe_rows(bad, positions, what)))
    for name in (INPUT_IDS, PROMPT_IDS):
        if arrays[name].size and int(arrays[name].max()) >= meta.vocab_size:
            out.append(("id_range", f"{name} holds ids >= vocab_size {meta.vocab_size}"))
    expected = stored_positions(arrays[LOSS_MASK], meta.positions)
    if not np.array_equal(positions, expected):
        out.append(("positions", f"{len(positions)} rows at positions that differ from stored_positions(loss_mask, "
                                 f"{meta.positions!r}) ({len(expected)} expected)"))
    return out


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
            problems.extend(Problem(c, d, shard, sid) for c, d in check_sample(arrays, sid, part.checksums[j], meta))
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
