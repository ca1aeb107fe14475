"""Top-K rows between the teacher's arrays and the stored ones: `encode_rows` (writer) and `decode_rows`
(reader, verify). The conventions they implement are in `cache_schema.format`'s docstring; the codes in
`cache_schema.encoding`.

Stored forms, per row of K entries (or n <= K with mass-adaptive K, the rows then stored one after another):
- fp16: ids as uint32, log-probs as float16, both in rank order.
- quantised encodings: each id becomes its symbol, its rank in the part's IdTable (tokens by descending
  frequency in the part's first rows; an id not in the table is len(table) + id). Entries are sorted by
  (code, symbol) (rank order, ties by symbol); log-probs are stored as the first code then the differences
  to the previous code (non-negative); symbols raw where a run of equal codes starts and as the difference
  to the previous symbol (>= 1) inside a run. Frequent tokens get small symbols and ties are common among
  unlikely tokens (the coarse bins), so both arrays hold small numbers in uint32 that bitshuffle + zstd
  pack tightly. (Differences between the starts of runs would not be smaller: the teacher's order among
  distinct probabilities is unrelated to token frequency.) Sizes of the alternatives: BENCHMARKS.md,
  "Codec and chunk choices".
- topk_logmass (all but fp16 at fixed K): log of the teacher's probability of the row's entries.

Decoding works on [R, K] arrays throughout (a mass-adaptive row is scattered into its first n columns), so
fixed and adaptive rows share one vectorised path. Both directions run in blocks of BLOCK_ROWS rows: whole
samples (thousands of rows) make every [R, K] temporary a fresh multi-MiB allocation whose page faults
cost more than the work (BENCHMARKS.md, "Codec and chunk choices").
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from cache_schema.encoding import Encoding
from cache_schema.format import PAD_LOGPROB, TOPK_COUNTS, TOPK_IDS, TOPK_LOGMASS, TOPK_LOGPROBS, tail_mass

_ID_BITS = 33  # symbols (< 2 * 2**32) sit in the low 33 bits of the (code, symbol) sort key
BLOCK_ROWS = 256  # [256, K=128] float64 temporaries are 256 KiB: they stay in cache and in the allocator


@dataclass(frozen=True)
class IdTable:
    """Token ids by descending frequency (ties by id) in a part's first rows, for the quantised encodings."""

    table: np.ndarray
    """(D,) uint32 distinct token ids; symbol s < D stands for table[s], s >= D for the id s - D."""

    @classmethod
    def from_ids(cls, ids: np.ndarray) -> IdTable:
        counts = np.bincount(np.asarray(ids, dtype=np.int64).ravel())
        seen = np.flatnonzero(counts)
        return cls(seen[np.argsort(-counts[seen], kind="stable")].astype(np.uint32))

    @functools.cached_property
    def _symbols(self) -> np.ndarray:
        """id -> symbol for ids up to the table's largest."""
        d = len(self.table)
        lut = np.arange(int(self.table.max()) + 1 if d else 0, dtype=np.int64) + d  # escaped, unless in the table
        lut[self.table] = np.arange(d)
        return lut

    def to_symbols(self, ids: np.ndarray) -> np.ndarray:
        """int64 ids -> int64 symbols."""
        lut = self._symbols
        if ids.size and int(ids.max()) < len(lut):
            return lut[ids]
        inside = ids < len(lut)
        return np.where(inside, lut[np.where(inside, ids, 0)] if len(lut) else 0, ids + len(self.table))

    @functools.cached_property
    def _ids(self) -> np.ndarray:
        return self.table.astype(np.int64)

    def to_ids(self, symbols: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """int64 symbols -> int64 ids, into `out` if given."""
        d = len(self.table)
        if d and symbols.size and 0 <= int(symbols.min()) and int(symbols.max()) < d:
            return np.take(self._ids, symbols, out=out)
        ids = np.where(symbols < d, self._ids[np.clip(symbols, 0, d - 1)] if d else 0, symbols - d)
        if out is None:
            return ids
        out[...] = ids
        return out

    def digest(self) -> bytes:
        """SHA-256 of the table, mixed into every sample checksum of its part."""
        return hashlib.sha256(self.table.astype("<u4").tobytes()).digest()


def keep_counts(logprobs: np.ndarray, epsilon: float) -> np.ndarray:
    """(R, K) log-probs in rank order -> (R,) int64: the fewest leading entries whose probabilities sum to
    at least 1 - epsilon, or K when the whole row holds less (computed in float64)."""
    x = logprobs.astype(np.float64)
    top = x[:, :1]
    cum = np.cumsum(np.exp(x - top), axis=1)  # relative to the top entry: no underflow to an all-zero row
    with np.errstate(over="ignore"):
        target = (1.0 - epsilon) * np.exp(-top)
    return np.minimum((cum < target).sum(axis=1) + 1, x.shape[1])


def _steps(a: np.ndarray) -> np.ndarray:
    """(R, K) int64 -> uint32: the first column, then each column minus the one before (values that fit)."""
    out = np.empty(a.shape, dtype=np.uint32)
    out[:, :1] = a[:, :1]
    np.subtract(a[:, 1:], a[:, :-1], out=out[:, 1:], casting="unsafe")
    return out


def encode_rows(ids: np.ndarray, logprobs: np.ndarray, enc: Encoding, *, epsilon: float | None,
                exact_mass: bool, id_table: IdTable | None = None) -> dict[str, np.ndarray]:
    """Validated teacher rows (ids uint32 [R, K], float32 log-probs [R, K] in rank order, each row's
    probabilities summing to at most 1 up to float error) -> the stored row arrays by name:
    topk_ids, topk_logprobs ([R, K], or [E] flat when `epsilon` is set), topk_counts [R] (only with
    `epsilon`), topk_logmass [R] (only with `exact_mass`). The quantised encodings need the part's
    `id_table`."""
    if enc.delta_coded and id_table is None:
        raise ValueError(f"the {enc.name} encoding stores ids as symbols of an IdTable")
    blocks = [_encode_block(ids[a : a + BLOCK_ROWS], logprobs[a : a + BLOCK_ROWS], enc, epsilon, exact_mass,
                            id_table) for a in range(0, max(len(logprobs), 1), BLOCK_ROWS)]
    if len(blocks) == 1:
        return blocks[0]
    return {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}


def _encode_block(ids: np.ndarray, logprobs: np.ndarray, enc: Encoding, epsilon: float | None,
                  exact_mass: bool, id_table: IdTable | None) -> dict[str, np.ndarray]:
    k = logprobs.shape[1]
    out: dict[str, np.ndarray] = {}
    keep = None
    if epsilon is not None:
        counts = keep_counts(logprobs, epsilon)
        keep = np.arange(k) < counts[:, None]
        out[TOPK_COUNTS] = counts.astype(np.uint32)
    if exact_mass and len(logprobs):
        x = logprobs.astype(np.float64)
        top = x[:, 0]
        rel = np.exp(x - top[:, None])
        lse = top + np.log(np.where(keep, rel, 0.0).sum(axis=1) if keep is not None else rel.sum(axis=1))
        # Float error can put a teacher row's sum a little above 1: its tail is then 0.
        out[TOPK_LOGMASS] = np.minimum(lse, 0.0).astype(np.float32)
    elif exact_mass:
        out[TOPK_LOGMASS] = np.empty(0, dtype=np.float32)
    codes = enc.encode(logprobs)
    if enc.delta_coded:
        c = codes.astype(np.int64)
        if keep is not None:  # dropped entries sort last, so that ties cannot swap an entry in or out
            c[~keep] = np.int64(1) << 29  # above every code
        key = np.sort((c << _ID_BITS) | id_table.to_symbols(ids.astype(np.int64)), axis=1)
        c, i = key >> _ID_BITS, key & ((1 << _ID_BITS) - 1)
        codes, ids = _steps(c), i.astype(np.uint32)
        in_run = codes == 0
        in_run[:, 0] = False
        ids[in_run] = _steps(i)[in_run]
    else:
        ids = ids.astype(np.uint32, copy=False)
    if keep is not None:
        ids, codes = ids[keep], codes[keep]
    out[TOPK_IDS], out[TOPK_LOGPROBS] = ids, codes
    return out


@dataclass(frozen=True)
class DecodedRows:
    ids: np.ndarray
    """(R, K) int64; padded past `counts`."""
    logprobs: np.ndarray
    """(R, K) float32; PAD_LOGPROB past `counts`."""
    counts: np.ndarray
    """(R,) int64 real entries per row."""
    tail: np.ndarray
    """(R,) float32 probability outside the row's entries."""
    codes: np.ndarray | None = None
    """With detail=True: (R, K) the entries' codes (float16 values for fp16); meaningless past `counts`."""
    raw: np.ndarray | None = None
    """With detail=True: (R, K) float32 decoded log-probs before the shift (PAD_LOGPROB past `counts`)."""
    shift: np.ndarray | None = None
    """With detail=True and topk_logmass: (R,) float32 the constant added to each row to match it."""
    symbols: np.ndarray | None = None
    """With detail=True and a quantised encoding: (R, K) int64 the entries' IdTable symbols."""

    def valid(self) -> np.ndarray:
        """(R, K) bool: true on real entries."""
        return np.arange(self.ids.shape[1]) < self.counts[:, None]

    def error_bound(self, enc: Encoding) -> np.ndarray:
        """(R, K) float32 (decode_rows with detail=True): the most the teacher's log-prob of each real entry
        can differ from its decoded value: the code's bin half-width, plus the row's shift, plus float32
        rounding (0 on padding)."""
        bound = enc.bin_halfwidth(self.codes).astype(np.float32)
        if self.shift is not None:
            # The shift is computed in float32 (log-sum-exp of K terms) and added in float32.
            bound = bound + np.abs(self.shift)[:, None] + np.float32(2.0**-20) + np.abs(self.raw) * np.float32(2.0**-22)
        return np.where(self.valid(), bound, np.float32(0.0))


def pad_ids(ids: np.ndarray, counts: np.ndarray, vocab_size: int, *, clean: bool = False) -> np.ndarray:
    """Fill columns >= counts of (R, K) int64 ids, in place, with the largest vocabulary ids that are not
    among the row's entries, descending. Returns `ids`. `clean`: the columns to fill hold nothing larger than
    the row's entries (as decode leaves them), so the row maximum needs no mask."""
    k = ids.shape[1]
    cols = np.arange(k)
    padding = cols >= counts[:, None]
    # A row that holds one of the top K ids of the vocabulary itself may collide: redo those rows one by one.
    largest = ids.max(axis=1, initial=-1) if clean else np.where(padding, -1, ids).max(axis=1, initial=-1)
    collide = (counts < k) & (largest >= vocab_size - k)
    np.copyto(ids, (vocab_size - 1 + counts)[:, None] - cols, where=padding)  # vocab-1, vocab-2, ... from `counts`
    for r in np.flatnonzero(collide):
        n = int(counts[r])
        kept = set(ids[r, :n].tolist())
        free = [v for v in range(vocab_size - 1, vocab_size - 1 - k - n, -1) if v not in kept]
        ids[r, n:] = free[: k - n]
    return ids


_LOW32 = np.int64(0xFFFFFFFF)


def _undo_runs(stored: np.ndarray, code_steps: np.ndarray) -> np.ndarray:
    """(R, K) uint32 symbols stored raw at each run start (code step > 0, or column 0) and as differences
    inside runs -> int64 symbols: a cumulative sum restarted at every run start. Done as 1-D cumulative sums
    over the whole block (numpy's 1-D scans are faster than scans along the rows of a 2-D array): the
    first gives the sum before each run's start; subtracting, at each run start, the previous run's total
    makes the second restart there (cheaper than a gather by run number or a running maximum). In int64 the block's sums
    (< 2**47) cannot overflow; taken mod 2**32 they equal the uint32 sums the writer's differences wrap in,
    so every symbol (< 2**32) is exact, and corrupt input decodes to the same wrapped values as before."""
    rows, k = stored.shape
    flat = stored.astype(np.int64).ravel()
    starts = (code_steps > 0).ravel()
    starts[::k] = True
    first = np.flatnonzero(starts)
    before = np.cumsum(flat)[first] - flat[first]  # the sum before each run's start
    flat[first[1:]] -= np.diff(before)  # minus the previous run's total
    out = np.cumsum(flat, out=flat)
    out &= _LOW32
    return out.reshape(rows, k)


def decode_rows(stored: dict[str, np.ndarray], enc: Encoding, k: int, vocab_size: int, *,
                id_table: IdTable | None = None, detail: bool = False) -> DecodedRows:
    """Stored row arrays of R rows (as `encode_rows` returns them, with the same `id_table`) -> DecodedRows
    (`detail`: also the codes, symbols, the values before the shift and the shift, for checks and error
    bounds). ValueError when the arrays do not fit together (entry counts)."""
    if enc.delta_coded and id_table is None:
        raise ValueError(f"the {enc.name} encoding stores ids as symbols of an IdTable")
    counts = stored.get(TOPK_COUNTS)
    ids, codes = stored[TOPK_IDS], stored[TOPK_LOGPROBS]
    if counts is None:
        counts = np.full(len(ids), k, dtype=np.int64)
        starts = None
    else:
        counts = counts.astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        if (counts > k).any() or (counts < 1).any() or starts[-1] != len(ids) or len(ids) != len(codes):
            raise ValueError(f"{len(ids)} stored entries for rows of {int(starts[-1])} entries (counts must be "
                             f"in 1..{k})")
    logmass = stored.get(TOPK_LOGMASS)
    rows = len(counts)
    out = DecodedRows(
        ids=np.empty((rows, k), dtype=np.int64), logprobs=np.empty((rows, k), dtype=np.float32), counts=counts,
        tail=np.empty(rows, dtype=np.float32),
        codes=np.empty((rows, k), dtype=np.int64 if enc.delta_coded else codes.dtype) if detail else None,
        raw=np.empty((rows, k), dtype=np.float32) if detail else None,
        shift=np.empty(rows, dtype=np.float32) if detail and logmass is not None else None,
        symbols=np.empty((rows, k), dtype=np.int64) if detail and enc.delta_coded else None,
    )
    for a in range(0, rows, BLOCK_ROWS):
        b = min(a + BLOCK_ROWS, rows)
        if starts is None:
            block_ids, block_codes, valid = ids[a:b], codes[a:b], None
        else:
            valid = np.arange(k) < counts[a:b, None]
            block_ids = np.zeros((b - a, k), dtype=ids.dtype)
            block_ids[valid] = ids[starts[a] : starts[b]]
            block_codes = np.zeros((b - a, k), dtype=codes.dtype)
            block_codes[valid] = codes[starts[a] : starts[b]]
        _decode_block(out, a, b, block_ids, block_codes, valid, None if logmass is None else logmass[a:b], enc,
                      vocab_size, id_table)
    return out


def _decode_block(out: DecodedRows, a: int, b: int, ids: np.ndarray, codes: np.ndarray, valid: np.ndarray | None,
                  logmass: np.ndarray | None, enc: Encoding, vocab_size: int, id_table: IdTable | None) -> None:
    """Decode rows a:b ([b - a, K] stored ids and codes, scattered to columns) into `out`."""
    if enc.delta_coded:
        symbols = _undo_runs(ids, codes)
        if out.symbols is not None:
            out.symbols[a:b] = symbols
        id_table.to_ids(symbols, out=out.ids[a:b])
        codes = np.cumsum(codes, axis=1, dtype=np.uint32)  # codes <= max_code < 2**25
    else:
        out.ids[a:b] = ids
    values = out.logprobs[a:b]
    if logmass is None:  # fixed-K fp16 only (every ragged layout stores the mass): no padding to fill
        enc.decode(codes, out=values)
        out.tail[a:b] = tail_mass(values)
        if out.raw is not None:
            out.raw[a:b] = values
    else:
        raw = enc.decode(codes)
        if valid is not None:
            raw[~valid] = PAD_LOGPROB
        # Quantised rows are in rank order by construction (codes only grow), so column 0 holds the maximum.
        top = raw[:, 0] if enc.delta_coded else raw.max(axis=1)
        terms = np.subtract(raw, top[:, None], out=values)  # `values` as scratch: [R, K] float32
        lse = top + np.log(np.exp(terms, out=terms).sum(axis=1))
        shift = (logmass - lse).astype(np.float32)
        np.add(raw, shift[:, None], out=values)  # PAD_LOGPROB + shift == PAD_LOGPROB in float32
        out.tail[a:b] = np.clip(-np.expm1(logmass), 0.0, 1.0)
        if out.shift is not None:
            out.shift[a:b] = shift
        if out.raw is not None:
            out.raw[a:b] = raw
    if valid is not None:
        # Past `counts`, decoding left 0 (fp16) or a repeat of the row's last id (quantised encodings).
        pad_ids(out.ids[a:b], out.counts[a:b], vocab_size, clean=True)
    if out.codes is not None:
        out.codes[a:b] = codes
