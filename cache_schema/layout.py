"""The cache format, version 1: every array name, shape, dtype and chunking, the position convention,
the row conventions, and the root and part metadata. Stage 1 writes and stage 2 reads only through these
definitions (and `cache_schema.rows`, which turns teacher rows into stored arrays and back).

Store layout::

    cache.zarr/
      zarr.json                 root attrs: RootMeta (schema_version, k, encoding, mass_epsilon, positions,
                                teacher, tokenizer, chat_template_fingerprint, vocab_size, dataset, num_shards,
                                config, sampled)
      parts/00017/              one group per shard, written by exactly one process (see lease.py)
        zarr.json               attrs: PartMeta; `complete` becomes true in the very last write
        writer.lease            the writer's lease while it runs (not a Zarr node)
        sample_ids      (n,)    str      trajectory ids, in write order
        token_offsets   (n+1,)  int64    sample i's tokens are input_ids[token_offsets[i]:token_offsets[i+1]]
        input_ids       (T,)    uint32   rendered trajectory tokens
        loss_mask       (T,)    bool     true on assistant tokens
        prompt_offsets  (n+1,)  int64    into prompt_ids
        prompt_ids      (P,)    uint32   the task prompt tokens the hypernetwork reads
        row_offsets     (n+1,)  int64    into positions and the other per-row arrays
        positions       (R,)    uint32   token index t (within its sample) of each stored row
        topk_ids        (R, K)  uint32   the teacher's top-K token ids, rank order (best first); with the
                                         quantised encodings coded along the row (see rows.py)
        topk_logprobs   (R, K)  encoded  their log-probs (see encoding.py and rows.py), same order
        topk_logmass    (R,)    float32  [all but fp16 without mass_epsilon] log of the row's stored mass
        id_table        (D,)    uint32   [quantised encodings] token ids by frequency in the part's first
                                         rows; top-K ids are stored as ranks in it (rows.IdTable)
        checksums       (n,)    uint64   per-sample checksum (`sample_checksum`)
      with mass_epsilon set (mass-adaptive K), rows have 1..K entries, stored flat:
        entry_offsets   (n+1,)  int64    into topk_ids / topk_logprobs
        topk_counts     (R,)    uint32   entries kept in each row
        topk_ids        (E,)    uint32   the rows' entries one after another (E = sum of topk_counts)
        topk_logprobs   (E,)    encoded
      with sampled rows (RS-KD, RootMeta.sampled set; no topk_logprobs, topk_logmass or id_table):
        entry_offsets   (n+1,)  int64    into topk_ids / draw_counts
        topk_counts     (R,)    uint32   distinct drawn ids in each row (0..N)
        topk_ids        (E,)    uint32   each row's distinct drawn ids, by descending draw count, ties by
                                         ascending id
        draw_counts     (E,)    uint16   how often each was drawn (>= 1; a row's counts sum to <= N)
      Checksums are SHA-256 in every layout but the original one (fp16 at fixed K).

Position convention: the row stored for position t holds the teacher's distribution over token t+1
given tokens 0..t (the logits read at position t predict the next token). So t < T-1 always, and
`stored_positions` says which t get a row: with positions='assistant', every t whose NEXT token is an
assistant token (loss_mask[t+1]); with positions='all', every t in 0..T-2.

Row conventions (what `CacheSample` hands to training, whatever the encoding):
- Rank order: entries best first. With the quantised encodings (encoding.py), entries whose stored codes
  are equal (teacher log-probs closer than the encoding resolves) come in the part's id-table order instead
  (most frequent token first; see rows.IdTable), and decode to equal log-probs.
- Tail: the probability outside a row's entries is tail = 1 - sum(exp(topk_logprobs)). With fp16 and no
  mass_epsilon it is derived from the decoded values. Otherwise `topk_logmass` stores log(sum of the
  teacher's probabilities of the row's entries) exactly (float32, computed in float64, clamped at 0), and
  the reader shifts the row's decoded log-probs by one constant so that their log-sum-exp equals it: the
  tail is then the teacher's, not the rounding's.
- Mass-adaptive K (mass_epsilon = eps): each row keeps the fewest top entries whose probabilities sum to
  at least 1 - eps (all K when the top-K hold less). Rows are always handed out as [R, K]: a row with n < K
  entries is padded at the end with log-prob PAD_LOGPROB (exp() of it is exactly 0, below any stored
  value, and the loss floor of -1e4 keeps it at probability 0) and with distinct ids not among the row's
  entries: the largest ids of the vocabulary, descending (padding rows of the embedding in practice).
  `CacheSample.topk_counts` says how many entries are real. So the K + 1 buckets the loss sees are the n
  kept ids, K - n buckets of exactly zero teacher mass, and the tail, which equals the kept-exact tail.
  (The student's probability on the padding ids sits in those zero buckets, not in its tail bucket, so a
  forward KL pushes it to 0: free for ids no model predicts, which the top of a padded vocabulary is: at
  K=128 the padding ids of the 151,936-row Qwen vocabulary are 151808..151935, all embedding padding.)

Sampled rows (RS-KD: Anshumann et al. 2025, "Sparse Logit Sampling"), SamplingMeta(draws=N, seed, support_k):
- Stage 1 draws N tokens per row with replacement from the teacher's distribution p at temperature 1 (by
  inverse CDF with uniforms made per sample from (seed, sample id), so runs repeat exactly) and stores the
  distinct ids with their counts c_i. The training target is the empirical distribution w_i = c_i / N:
  E[w_i] = p_i, so -sum_i w_i log s_i (the student's softmax s over the full vocabulary) has the expected
  value and gradient of the cross-entropy CE(p, s): unbiased, where a top-K target is not.
- Tail draws: with support 'full' (support_k None: the HF backend, vLLM's engine capture) every draw is a
  token and a row's counts sum to N: the target is unbiased. With support 'top-K' (vLLM's public path,
  whose prompt log-probs stop at the top-K) a
  draw beyond the top-K's mass is only counted, as N - sum of the row's counts, and the target is no longer
  exactly unbiased: stage 2's tail bucket (everything but the row's drawn ids) also holds the top-K ids that
  were not drawn, so the tail draws' weight is spread over them too. The bias shrinks as N and the top-K's
  mass grow (on a V=2000 toy with K=128 holding 86 % of the mass and N=64, the summed top-K gradient was
  -0.809 against -0.801 exact); for an unbiased cache use teacher.capture=engine, the hf backend or a K whose
  tail is negligible.
- Read back as CacheSample rows of width N (RootMeta.row_width): topk_ids the distinct ids then padding as
  for mass-adaptive rows, topk_logprobs log(c_i / N) then PAD_LOGPROB, topk_counts the distinct ids,
  tail_mass the tail draws / N. Stage 2's forward_tail loss at temperature 1 over these entries plus the
  tail bucket is KL(w || s) = CE(w, s) - H(w): the RS-KD loss (H(w) does not depend on the student).
- cache.encoding does not apply (counts are stored exactly) and must stay 'fp16'; mass_epsilon must be None.

Every chunk ends with a crc32c (Zarr's crc32c codec), so corrupt bytes raise on read instead of
returning wrong numbers; the per-sample checksums additionally tie a sample's arrays together.
Chunks are written whole by one process and `write_empty_chunks` is on, so a missing chunk is a fault.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
from zarr.codecs import BloscCname, BloscCodec, BloscShuffle, Crc32cCodec

from cache_schema.encoding import get_encoding
from common.errors import UserError

SCHEMA_VERSION = 1
PARTS_GROUP = "parts"
LEASE_FILE = "writer.lease"
PositionsMode = Literal["assistant", "all"]
POSITION_MODES: tuple[str, ...] = ("assistant", "all")
MAX_VOCAB = 2**32  # ids are stored as uint32

SAMPLE_IDS = "sample_ids"
TOKEN_OFFSETS = "token_offsets"
INPUT_IDS = "input_ids"
LOSS_MASK = "loss_mask"
PROMPT_OFFSETS = "prompt_offsets"
PROMPT_IDS = "prompt_ids"
ROW_OFFSETS = "row_offsets"
ENTRY_OFFSETS = "entry_offsets"
POSITIONS = "positions"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TOPK_COUNTS = "topk_counts"
TOPK_LOGMASS = "topk_logmass"
DRAW_COUNTS = "draw_counts"
ID_TABLE = "id_table"
CHECKSUMS = "checksums"

PAD_LOGPROB = -1e30
"""Log-prob of the padding entries of mass-adaptive rows (see the module docstring)."""

# ~1 MiB of decoded data per chunk reads fastest on these machines (shared/FACTS.md); 32 KiB was 5x slower.
DEFAULT_CHUNK_BYTES = 1 << 20

# Writer tolerances on the teacher's float32 log-probs (float error in its log-softmax).
LOGPROB_POSITIVE_TOL = 1e-4
PROB_SUM_TOL = 1e-3

_FIXED_DTYPES = {
    TOKEN_OFFSETS: np.dtype(np.int64),
    PROMPT_OFFSETS: np.dtype(np.int64),
    ROW_OFFSETS: np.dtype(np.int64),
    ENTRY_OFFSETS: np.dtype(np.int64),
    CHECKSUMS: np.dtype(np.uint64),
    INPUT_IDS: np.dtype(np.uint32),
    LOSS_MASK: np.dtype(np.bool_),
    PROMPT_IDS: np.dtype(np.uint32),
    POSITIONS: np.dtype(np.uint32),
    TOPK_IDS: np.dtype(np.uint32),
    TOPK_COUNTS: np.dtype(np.uint32),
    TOPK_LOGMASS: np.dtype(np.float32),
    ID_TABLE: np.dtype(np.uint32),
    DRAW_COUNTS: np.dtype(np.uint16),  # counts <= draws <= 65535
}


def part_path(shard: int) -> str:
    """Group path of a shard's part, e.g. 'parts/00017'."""
    return f"{PARTS_GROUP}/{shard:05d}"


@dataclass(frozen=True)
class PartArrays:
    """The arrays a part holds for a cache's K, encoding and mass_epsilon, with their dtypes, shapes,
    chunking and codecs. `part_arrays(root_meta)` builds it."""

    k: int
    encoding: str
    ragged: bool
    """Rows stored flat, with per-row counts (mass-adaptive K, and sampled rows)."""
    sampled: bool = False
    """Sampled rows (RS-KD): distinct drawn ids with draw_counts instead of log-probs (ragged too)."""

    @property
    def exact_mass(self) -> bool:
        """Rows carry topk_logmass and are renormalised to it on read (all top-K layouts but fp16 without
        mass_epsilon)."""
        return not self.sampled and (self.ragged or get_encoding(self.encoding).delta_coded)

    @property
    def id_table(self) -> bool:
        """The part has an id_table (quantised encodings: ids are stored as its symbols, see rows.py)."""
        return not self.sampled and get_encoding(self.encoding).delta_coded

    @property
    def sha256_checksums(self) -> bool:
        """Per-sample checksums are SHA-256 (BLAKE2b in the original layout, see `sample_checksum`)."""
        return self.exact_mass or self.sampled

    @property
    def appended(self) -> tuple[str, ...]:
        """Arrays that get a slice per sample, in checksum order."""
        if self.sampled:
            return (INPUT_IDS, LOSS_MASK, PROMPT_IDS, POSITIONS, TOPK_IDS, DRAW_COUNTS, TOPK_COUNTS)
        extra = (TOPK_COUNTS,) if self.ragged else ()
        extra += (TOPK_LOGMASS,) if self.exact_mass else ()
        return (INPUT_IDS, LOSS_MASK, PROMPT_IDS, POSITIONS, TOPK_IDS, TOPK_LOGPROBS) + extra

    @property
    def per_sample(self) -> tuple[str, ...]:
        """Arrays with one element per sample (offsets have one more)."""
        entries = (ENTRY_OFFSETS,) if self.ragged else ()
        return (SAMPLE_IDS, TOKEN_OFFSETS, PROMPT_OFFSETS, ROW_OFFSETS) + entries + (CHECKSUMS,)

    @property
    def offsets(self) -> tuple[str, ...]:
        return tuple(name for name in self.per_sample if name.endswith("_offsets"))

    @property
    def all(self) -> tuple[str, ...]:
        return self.per_sample + self.appended + ((ID_TABLE,) if self.id_table else ())

    def offsets_of(self, name: str) -> str:
        """The offsets array that indexes an appended array's first axis."""
        if name in (INPUT_IDS, LOSS_MASK):
            return TOKEN_OFFSETS
        if name == PROMPT_IDS:
            return PROMPT_OFFSETS
        if name in (TOPK_IDS, TOPK_LOGPROBS, DRAW_COUNTS) and self.ragged:
            return ENTRY_OFFSETS
        return ROW_OFFSETS

    def dtype(self, name: str) -> np.dtype | type:
        """Stored dtype of an array (`str` for sample_ids)."""
        if name == SAMPLE_IDS:
            return str
        if name == TOPK_LOGPROBS:
            return get_encoding(self.encoding).dtype
        return _FIXED_DTYPES[name]

    def row_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one element along the first axis: (K,) for fixed-K top-K arrays, () otherwise."""
        return (self.k,) if name in (TOPK_IDS, TOPK_LOGPROBS) and not self.ragged else ()

    def chunk_length(self, name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
        """Elements along axis 0 per chunk: about `chunk_bytes` of DECODED data (the top-K arrays count 4 bytes
        per value, so topk_ids and topk_logprobs share row chunks: 2048 rows at K=128)."""
        if name == SAMPLE_IDS:
            per_item = 64  # a typical id's length; the chunk count for ids hardly matters
        elif name in (TOPK_IDS, TOPK_LOGPROBS):
            per_item = 4 * int(np.prod(self.row_shape(name)))
        else:
            per_item = _FIXED_DTYPES[name].itemsize
        return max(1, chunk_bytes // per_item)

    def codecs(self, name: str) -> list:
        """Zarr compressors (bytes -> bytes codecs) of an array, then crc32c (see above).

        Measured on Zipf-like rows at K=128, one core: raw ids (uint32; below 151936 the top 14 bits are zero)
        with lz4 + bitshuffle take ~170 B/row at ~1.2M rows/s, zstd-1 + byte shuffle ~180 B/row at ~0.4M
        rows/s; fp16 log-probs with zstd-1 + byte shuffle ~163 B/row at ~0.7M rows/s, lz4 ~178 B/row at
        ~1.6M rows/s. Higher zstd levels gained <2%. The arrays of the quantised encodings (small
        non-negative integers in uint32, mostly zero high bits), zstd-1 over the whole chunk as one block
        (4-18% smaller than blosc's default blocks), measured at K=128 on the demo teacher's rows / synthetic
        rows: qsqrt5's id symbols (long runs of small in-run steps) with byte shuffle 117 / 123 B/row,
        bitshuffle 130 / 123; qlog8's (mostly raw symbols) with bitshuffle 153 / 165, byte shuffle 156 / 172;
        qsqrt5's codes with bitshuffle 22 / 18, byte shuffle 27 / 23; lz4 8-45% larger; zstd-3 to -6 gained
        0-5% at a third of the writing speed or less.
        Sampled rows, measured on the demo teacher's HF draws (5013 rows of the bundled sample; distinct ids per
        row 10.4 / 18.4 / 32.7 at N = 16 / 32 / 64), zstd-1 + byte shuffle over the whole chunk: topk_ids
        18.6 / 32.1 / 55.5 B/row (bitshuffle 19.9 / 36.7 / 59.3 in default blocks, lz4 + bitshuffle 31.8 /
        56.8 / 72.0), draw_counts 1.8 / 2.9 / 4.3 (bitshuffle 2.5 / 4.3 / 7.1), topk_counts 0.5 / 0.6 / 0.8
        (bitshuffle 0.8 / 1.0 / 1.1)."""
        enc = get_encoding(self.encoding)
        delta_coded = enc.delta_coded and not self.sampled
        if self.sampled and name in (TOPK_IDS, DRAW_COUNTS, TOPK_COUNTS):
            blosc = BloscCodec(cname=BloscCname.zstd, clevel=1, shuffle=BloscShuffle.shuffle,
                               blocksize=DEFAULT_CHUNK_BYTES)
        elif name == TOPK_IDS and delta_coded:
            runs = not getattr(enc, "uniform", True)
            blosc = BloscCodec(cname=BloscCname.zstd, clevel=1,
                               shuffle=BloscShuffle.shuffle if runs else BloscShuffle.bitshuffle,
                               blocksize=DEFAULT_CHUNK_BYTES)
        elif name == TOPK_LOGPROBS and delta_coded:
            blosc = BloscCodec(cname=BloscCname.zstd, clevel=1, shuffle=BloscShuffle.bitshuffle,
                               blocksize=DEFAULT_CHUNK_BYTES)
        elif name in (TOPK_COUNTS, TOPK_LOGMASS):
            blosc = BloscCodec(cname=BloscCname.zstd, clevel=1, shuffle=BloscShuffle.bitshuffle)
        elif name in (INPUT_IDS, PROMPT_IDS, POSITIONS, TOPK_IDS, LOSS_MASK):
            blosc = BloscCodec(cname=BloscCname.lz4, clevel=5, shuffle=BloscShuffle.bitshuffle)
        elif name == SAMPLE_IDS:
            blosc = BloscCodec(cname=BloscCname.zstd, clevel=1, shuffle=BloscShuffle.noshuffle)
        else:  # fp16 log-probs, offsets, checksums
            blosc = BloscCodec(cname=BloscCname.zstd, clevel=1, shuffle=BloscShuffle.shuffle)
        return [blosc, Crc32cCodec()]


def part_arrays(meta: RootMeta) -> PartArrays:
    """The arrays of every part of a cache with this root metadata."""
    sampled = meta.sampled is not None
    return PartArrays(k=meta.k, encoding=meta.encoding, ragged=sampled or meta.mass_epsilon is not None,
                      sampled=sampled)


def stored_positions(loss_mask: np.ndarray, mode: str) -> np.ndarray:
    """Token positions t (uint32, increasing) that get a top-K row: the row at t predicts token t+1.

    'assistant': every t with loss_mask[t+1] true; 'all': 0..T-2.
    """
    mask = np.asarray(loss_mask, dtype=bool)
    if mask.ndim != 1:
        raise ValueError(f"loss_mask must be 1-D, got shape {mask.shape}")
    if mode == "assistant":
        return np.flatnonzero(mask[1:]).astype(np.uint32)
    if mode == "all":
        return np.arange(max(len(mask) - 1, 0), dtype=np.uint32)
    raise UserError(f"positions mode {mode!r}: expected one of {list(POSITION_MODES)}")


def sample_checksum(sample_id: str, arrays: dict[str, np.ndarray], names: tuple[str, ...], *,
                    sha256: bool, salt: bytes = b"") -> int:
    """64 bits of a hash over a sample's id, `salt` (the digest of the part's id_table, which its ids are
    stored relative to) and its arrays `names` (PartArrays.appended) as stored (after decompression, before
    log-prob decoding: decoding is a pure function of the stored values, so this covers the decoded arrays
    at a fraction of the bytes). Each array is prefixed by its name and shape so that bytes cannot move
    between arrays. The hash is BLAKE2b in the original layout (fp16 at fixed K) and
    SHA-256 in the others (`PartArrays.sha256_checksums`): it runs at ~1.8 GB/s on CPUs with SHA
    instructions against BLAKE2b's ~0.55, 0.6 instead of 2 us per row at K=128 with 4-byte codes."""
    h = hashlib.sha256() if sha256 else hashlib.blake2b(digest_size=8)
    h.update(sample_id.encode())
    h.update(salt)
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}{a.shape}|".encode())
        h.update(a.view(np.uint8) if a.dtype == np.bool_ else a.astype(a.dtype.newbyteorder("<"), copy=False))
    return int.from_bytes(h.digest()[:8], "little")


def row_violations(topk_ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, *, positive_tol: float = 0.0,
                   logprob_slack: np.ndarray | float = 0.0) -> list[tuple[str, np.ndarray, str]]:
    """The format's promises about top-K rows, checked together: (check name, (R,) mask of the rows that
    break it, what is wrong) for each broken promise. The writer passes the teacher's exact float32 values;
    verify passes decoded values with the encoding's error bound as `logprob_slack`."""
    with np.errstate(invalid="ignore", over="ignore"):
        checks = [
            ("finite", ~np.isfinite(logprobs).all(axis=1), "log-probs not finite"),
            ("rank_order", (np.diff(logprobs, axis=1) > 0).any(axis=1),
             "log-probs not in rank order (non-increasing along K)"),
            ("logprob_positive", (logprobs > positive_tol).any(axis=1), f"log-probs above {positive_tol:g}"),
            ("prob_sum", np.exp(logprobs - logprob_slack).sum(axis=1) > 1 + PROB_SUM_TOL,
             f"probabilities summing above 1 + {PROB_SUM_TOL:g}"),
            ("id_range", (topk_ids >= vocab_size).any(axis=1), f"top-K ids >= vocab_size {vocab_size}"),
            ("duplicate_ids", (np.diff(np.sort(topk_ids, axis=1), axis=1) == 0).any(axis=1),
             "a token id twice in a row"),
        ]
    return [(name, bad, what) for name, bad, what in checks if bad.any()]


def describe_rows(bad: np.ndarray, positions: np.ndarray, what: str) -> str:
    """'<what> in N of R rows (first at position t)' for a (R,) mask of bad rows."""
    first = int(np.flatnonzero(bad)[0])
    return f"{what} in {int(bad.sum())} of {len(bad)} rows (first at position {int(positions[first])})"


def check_teacher_rows(topk_ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, positions: np.ndarray, where: str,
                       *, min_value: float | None = None, encoding: str = "") -> None:
    """The writer's checks of a sample's teacher top-K rows (`row_violations` with the writer's tolerance, and
    log-probs >= `min_value`, the encoding's smallest, when given): UserError '<where>: <first problem>'.
    Stage 1 also runs it on the rows that sampled draws come from, which the writer never sees."""
    violations = row_violations(topk_ids, logprobs, vocab_size, positive_tol=LOGPROB_POSITIVE_TOL)
    if min_value is not None:
        too_low = logprobs.min(axis=1) < min_value
        if too_low.any():
            violations.append(("range", too_low, f"log-probs below the {encoding} encoding's minimum {min_value:g}"))
    if violations:
        _, bad, what = violations[0]
        raise UserError(f"{where}: {describe_rows(bad, positions, what)}")


def config_hash(config: dict) -> str:
    """Short stable hash of a resolved run config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Samples as the writer takes them and the reader returns them


@dataclass(frozen=True, kw_only=True)
class SampleRows:
    """One trajectory's teacher rows, as stage 1 hands them to the writer (numpy arrays or CPU tensors)."""

    sample_id: str
    input_ids: Any
    """(T,) integer token ids."""
    loss_mask: Any
    """(T,) bool, true on assistant tokens."""
    prompt_ids: Any
    """(P,) integer task prompt token ids."""
    positions: Any
    """(R,) integer, must equal stored_positions(loss_mask, root.positions)."""
    topk_ids: Any = None
    """(R, K) integer, rank order (top-K caches only)."""
    topk_logprobs: Any = None
    """(R, K) float32 log-probs, non-increasing along K (top-K caches only)."""
    draws: Any = None
    """(R, N) integers in [-1, vocab_size): N draws per row from the teacher's distribution, -1 = a draw
    outside the teacher's top-K (sampled caches only, instead of topk_ids and topk_logprobs)."""


@dataclass(frozen=True, kw_only=True)
class CacheSample:
    """One trajectory read back from the cache, decoded to the dtypes training uses."""

    sample_id: str
    input_ids: np.ndarray
    """(T,) int64"""
    loss_mask: np.ndarray
    """(T,) bool"""
    prompt_ids: np.ndarray
    """(P,) int64"""
    positions: np.ndarray
    """(R,) int64; row r is the teacher's distribution over token positions[r] + 1"""
    topk_ids: np.ndarray
    """(R, K) int64, rank order; entries past topk_counts are padding (see the module docstring)"""
    topk_logprobs: np.ndarray
    """(R, K) float32; PAD_LOGPROB past topk_counts"""
    topk_counts: np.ndarray
    """(R,) int64 real entries per row: K unless the cache is mass-adaptive or sampled"""
    tail_mass: np.ndarray
    """(R,) float32 probability outside the row's entries, 1 - sum(exp(topk_logprobs)) clipped to [0, 1]
    (sampled rows: the fraction of draws outside the teacher's top-K)"""


def tail_mass(logprobs: np.ndarray) -> np.ndarray:
    """(R, K) log-probs -> (R,) float32 probability outside the top-K, clipped to [0, 1]."""
    return np.clip(1.0 - np.exp(logprobs, dtype=np.float32).sum(axis=-1), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Metadata: frozen keyword-only dataclasses, checked when parsed


def _check_type(value: Any, tp: type, key: str, where: str) -> Any:
    if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
        raise UserError(f"{where}: attribute '{key}' must be {tp.__name__}, got {value!r}")
    return value


class _Meta:
    """Base of the metadata dataclasses: `to_dict` and a `from_dict` that checks every field's type from its
    annotation (nested metadata recursively; a field is optional only when its type admits None)."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Any, where: str):
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a mapping, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            args = typing.get_args(hints[f.name])
            optional = type(None) in args
            tp = next(a for a in args if a is not type(None)) if optional else hints[f.name]
            if typing.get_origin(tp) is Literal:
                tp = str  # the allowed values are checked in __post_init__
            value = d.get(f.name)
            if value is None:
                if not optional:
                    raise UserError(f"{where}: missing attribute '{f.name}'")
            elif isinstance(tp, type) and issubclass(tp, _Meta):
                value = tp.from_dict(value, f"{where} {f.name}")
            else:
                _check_type(value, typing.get_origin(tp) or tp, f.name, where)
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class TeacherMeta(_Meta):
    model: str
    revision: str | None = None
    dtype: str
    quantization: str | None = None
    backend: str
    engine_version: str
    """e.g. 'vllm 0.32.0'; may differ between parts written by different runs (see PartMeta)."""

    # Fields that define the teacher's numbers; engine_version is recorded per part instead.
    IDENTITY = ("model", "revision", "dtype", "quantization", "backend")


@dataclass(frozen=True, kw_only=True)
class TokenizerMeta(_Meta):
    name: str
    path: str
    """Where `cache show` loads it from (a local folder AutoTokenizer reads); may be empty."""
    fingerprint: str


@dataclass(frozen=True, kw_only=True)
class DatasetMeta(_Meta):
    source: str
    fingerprint: str
    filter: dict = field(default_factory=dict)


MAX_DRAWS = 65535  # draw counts are stored as uint16


@dataclass(frozen=True, kw_only=True)
class SamplingMeta(_Meta):
    """Sampled rows (RS-KD): how the draws were made."""

    draws: int
    """N draws per row, with replacement, from the teacher's distribution at temperature 1."""
    seed: int
    """Seed of the per-sample uniforms (stage1_teacher.sampling.sample_uniforms)."""
    support_k: int | None = None
    """None: every draw is a token (support 'full': the HF backend and vLLM's engine capture resolve draws outside
    the top-K exactly); an int K: draws outside the engine's top-K are only counted, as the row's tail (support
    'top-K', vLLM's public path)."""

    @property
    def support(self) -> str:
        """'full' or 'top-<K>'."""
        return "full" if self.support_k is None else f"top-{self.support_k}"

    def __post_init__(self) -> None:
        where = "cache root metadata sampled"
        if not 1 <= self.draws <= MAX_DRAWS:
            raise UserError(f"{where}: draws must be in [1, {MAX_DRAWS}], got {self.draws}")
        if self.seed < 0:
            raise UserError(f"{where}: seed must be >= 0, got {self.seed}")
        if self.support_k is not None and self.support_k < 1:
            raise UserError(f"{where}: support_k must be >= 1 or null, got {self.support_k}")


@dataclass(frozen=True, kw_only=True)
class RootMeta(_Meta):
    """The cache's root attributes."""

    schema_version: int = SCHEMA_VERSION
    k: int
    encoding: str
    """Log-prob encoding (cache_schema.encoding.ENCODINGS)."""
    mass_epsilon: float | None = None
    """Mass-adaptive K: rows keep the fewest top entries covering 1 - mass_epsilon (None: all K)."""
    positions: PositionsMode
    teacher: TeacherMeta
    tokenizer: TokenizerMeta
    chat_template_fingerprint: str
    vocab_size: int
    dataset: DatasetMeta
    num_shards: int
    config: dict = field(default_factory=dict)
    """The resolved run config of the run that created the cache."""
    sampled: SamplingMeta | None = None
    """Sampled rows (RS-KD) instead of top-K rows; None for a top-K cache."""

    def __post_init__(self) -> None:
        where = "cache root metadata"
        nested = [("teacher", TeacherMeta), ("tokenizer", TokenizerMeta), ("dataset", DatasetMeta)]
        if self.sampled is not None:
            nested.append(("sampled", SamplingMeta))
        for name, cls in nested:
            value = getattr(self, name)
            if not isinstance(value, cls):  # a plain mapping is accepted and checked like stored metadata
                object.__setattr__(self, name, cls.from_dict(value, f"{where} {name}"))
        if self.schema_version != SCHEMA_VERSION:
            raise UserError(f"{where}: schema_version {self.schema_version}, this code writes {SCHEMA_VERSION}")
        if self.k < 1:
            raise UserError(f"{where}: k must be >= 1, got {self.k}")
        if get_encoding(self.encoding).delta_coded and self.vocab_size > 2**31:
            raise UserError(f"{where}: the {self.encoding} encoding needs vocab_size <= 2**31, got {self.vocab_size}")
        eps = self.mass_epsilon
        if eps is not None:
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
                raise UserError(f"{where}: mass_epsilon must be a number in (0, 1) or null, got {eps!r}")
            object.__setattr__(self, "mass_epsilon", float(eps))
        if self.positions not in POSITION_MODES:
            raise UserError(f"{where}: positions must be one of {list(POSITION_MODES)}, got {self.positions!r}")
        if not 1 <= self.vocab_size <= MAX_VOCAB:
            raise UserError(f"{where}: vocab_size must be in [1, 2**32], got {self.vocab_size}")
        if self.k > self.vocab_size:
            raise UserError(f"{where}: k={self.k} exceeds vocab_size={self.vocab_size}")
        if self.num_shards < 1:
            raise UserError(f"{where}: num_shards must be >= 1, got {self.num_shards}")
        if self.sampled is not None:
            if self.mass_epsilon is not None:
                raise UserError(f"{where}: sampled rows and mass_epsilon do not combine")
            if self.encoding != "fp16":
                raise UserError(f"{where}: sampled rows store draw counts, not log-probs: encoding must be the "
                                f"default 'fp16', got {self.encoding!r}")
            if self.sampled.draws > self.vocab_size:
                raise UserError(f"{where}: sampled draws={self.sampled.draws} exceeds vocab_size={self.vocab_size} "
                                "(rows are padded with distinct ids)")
        try:
            json.dumps(self.config)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: config is not JSON-serialisable ({e})") from None

    def identity(self) -> dict[str, Any]:
        """Fields a run must agree on to add parts to an existing cache (dotted names)."""
        ident = {
            "k": self.k,
            "encoding": self.encoding,
            "mass_epsilon": self.mass_epsilon,
            "positions": self.positions,
            "vocab_size": self.vocab_size,
            "num_shards": self.num_shards,
            "tokenizer.fingerprint": self.tokenizer.fingerprint,
            "chat_template_fingerprint": self.chat_template_fingerprint,
            "dataset.fingerprint": self.dataset.fingerprint,
            "sampled": None if self.sampled is None else self.sampled.to_dict(),
        }
        ident.update({f"teacher.{f}": getattr(self.teacher, f) for f in TeacherMeta.IDENTITY})
        return ident

    @property
    def row_width(self) -> int:
        """Columns of the rows handed to training: k for top-K caches, the draws N for sampled ones."""
        return self.k if self.sampled is None else self.sampled.draws

    def mismatches(self, other: RootMeta) -> list[tuple[str, Any, Any]]:
        """(field, self's value, other's value) for each identity field that differs."""
        mine, theirs = self.identity(), other.identity()
        return [(key, mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]]

    @classmethod
    def from_dict(cls, d: Any, where: str) -> RootMeta:
        """Parse root attributes; `where` (the cache path) is named in errors. A different schema_version
        is refused with both versions named."""
        if not isinstance(d, dict) or "schema_version" not in d:
            return super().from_dict(d, where)  # names what is missing
        version = _check_type(d["schema_version"], int, "schema_version", where)
        if version != SCHEMA_VERSION:
            relation = "newer" if version > SCHEMA_VERSION else "older"
            raise UserError(
                f"{where}: cache schema_version {version} is {relation} than this code's {SCHEMA_VERSION}; "
                "use a matching hyperdistill version or rebuild the cache"
            )
        return super().from_dict(d, where)


@dataclass(frozen=True, kw_only=True)
class PartMeta(_Meta):
    """A part's attributes. Written twice: at start (complete=False) and when done (complete=True last)."""

    complete: bool
    shard: int
    owner: str
    k: int
    encoding: str
    n_samples: int = 0
    n_tokens: int = 0
    n_prompt_tokens: int = 0
    n_rows: int = 0
    config_hash: str
    """config_hash() of the resolved config of the run that wrote this part."""
    engine_version: str
    timings: dict = field(default_factory=dict)
    """Seconds (or rates) by name: the writer's own plus those passed to finish()."""
    extra: dict = field(default_factory=dict)
    """Other attributes passed to finish()."""

    def __post_init__(self) -> None:
        for key in ("n_samples", "n_tokens", "n_prompt_tokens", "n_rows"):
            if getattr(self, key) < 0:
                raise UserError(f"part metadata: attribute '{key}' must be >= 0, got {getattr(self, key)}")
