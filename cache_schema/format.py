"""The cache format, version 1: every array name, shape, dtype, chunking and codec, the position convention,
the row conventions and the samples as they go in and come out. Stage 1 writes and stage 2 reads only through
these definitions, `cache_schema.metadata` (the root and part attributes) and the row codecs
(`cache_schema.topk_rows`, `cache_schema.sampled_rows`: teacher rows to stored arrays and back; the log-prob
codes in `cache_schema.encoding`). The row checks the writer and verify share are `cache_schema.row_checks`.

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
                                         quantised encodings coded along the row (see topk_rows.py)
        topk_logprobs   (R, K)  encoded  their log-probs (see encoding.py and topk_rows.py), same order
        topk_logmass    (R,)    float32  [all but fp16 without mass_epsilon] log of the row's stored mass
        id_table        (D,)    uint32   [quantised encodings] token ids by frequency in the part's first
                                         rows; top-K ids are stored as ranks in it (topk_rows.IdTable)
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
  (most frequent token first; see topk_rows.IdTable), and decode to equal log-probs.
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
  mass grow (a measured example: BENCHMARKS.md, "Codec and chunk choices"); for an unbiased cache use
  teacher.capture=engine, the hf backend or a K whose tail is negligible.
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from zarr.codecs import BloscCname, BloscCodec, BloscShuffle, Crc32cCodec

from cache_schema.encoding import get_encoding
from common.errors import UserError

if TYPE_CHECKING:
    from cache_schema.metadata import RootMeta

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

# About 1 MiB of decoded data per chunk: small chunks make Zarr's per-chunk overhead dominate reads
# (BENCHMARKS.md, "Codec and chunk choices").
DEFAULT_CHUNK_BYTES = 1 << 20

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
        """The part has an id_table (quantised encodings: ids are stored as its symbols, see topk_rows.py)."""
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
        """Zarr compressors (bytes -> bytes codecs) of an array, then crc32c (see above). Chosen per array
        by measured size and speed (BENCHMARKS.md, "Codec and chunk choices"): lz4 + bitshuffle for raw ids and
        tokens (fast, and the ids' high bits are zero), zstd-1 + byte shuffle for fp16 log-probs, offsets and
        checksums, zstd-1 over whole chunks for the quantised encodings' small integers (byte shuffle for
        symbols with long runs, bitshuffle otherwise) and for sampled rows; higher zstd levels gained little at
        a fraction of the writing speed."""
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
    SHA-256 in the others (`PartArrays.sha256_checksums`): on CPUs with SHA instructions SHA-256 is the
    faster of the two (BENCHMARKS.md, "Codec and chunk choices")."""
    h = hashlib.sha256() if sha256 else hashlib.blake2b(digest_size=8)
    h.update(sample_id.encode())
    h.update(salt)
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}{a.shape}|".encode())
        h.update(a.view(np.uint8) if a.dtype == np.bool_ else a.astype(a.dtype.newbyteorder("<"), copy=False))
    return int.from_bytes(h.digest()[:8], "little")

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
