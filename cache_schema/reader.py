"""Reading a cache: `CacheReader(path)` is a map-style dataset of `CacheSample`s over the complete parts.

Random access reads only the chunks that hold the sample (the part's offsets are loaded once) and keeps a
small LRU of decoded chunks, so neighbouring samples that share a chunk decompress it once. The reader
pickles as its path plus the list of parts it reads and reopens itself in each process (DataLoader workers,
fork or spawn), so every worker sees exactly the parent's samples in the parent's order.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import zarr

from cache_schema.encoding import Encoding, get_encoding
from cache_schema.format import (
    CHECKSUMS, ID_TABLE, INPUT_IDS, LOSS_MASK, POSITIONS, PROMPT_IDS, PROMPT_OFFSETS, ROW_OFFSETS, SAMPLE_IDS,
    TOKEN_OFFSETS, CacheSample, part_arrays, part_path,
)
from cache_schema.metadata import PartMeta, RootMeta
from cache_schema.sampled_rows import decode_sampled
from cache_schema.storage import CacheLocation, PartStatus, open_root, part_status
from cache_schema.topk_rows import DecodedRows, IdTable, decode_rows
from common.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 64 << 20


class CacheCorrupt(UserError):
    """Bytes or metadata in the cache cannot be read back (names the part, array, chunk and sample)."""

    def __init__(self, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where = where
        self.detail = detail


class ChunkLRU:
    """Decoded chunks by (shard, array, chunk index), evicted least recently used beyond max_bytes.

    (Loading a sample's chunks, or decoding its rows, on a few threads was measured and dropped: see
    BENCHMARKS.md, "Codec and chunk choices".)"""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.nbytes = 0

    def get(self, key: tuple, load: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = load()
        self.items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes
        return value


class PartReader:
    """One complete part: metadata and index (ids, offsets, checksums) loaded and checked on open;
    `read_stored(j)` returns sample j's arrays in their stored dtypes. CacheCorrupt on any inconsistency."""

    def __init__(self, root: zarr.Group, shard: int, meta: RootMeta, where: str, lru: ChunkLRU):
        self.shard = shard
        self.where = f"{where} part {shard:05d}"
        self.lru = lru
        self.layout = part_arrays(meta)
        self.encoding = get_encoding(meta.encoding)
        self.k, self.vocab_size = meta.k, meta.vocab_size
        self.sampled = meta.sampled
        self.row_width = meta.row_width
        try:
            group = zarr.open_group(root.store, path=part_path(shard), mode="r")
            attrs = dict(group.attrs)
            nodes = {name: group.get(name) for name in self.layout.all}
        except Exception as e:  # torn or corrupt zarr.json files
            raise CacheCorrupt(self.where, f"cannot open ({type(e).__name__}: {e})") from None
        try:
            self.part_meta = PartMeta.from_dict(attrs, where="part metadata")
        except UserError as e:
            raise CacheCorrupt(self.where, str(e)) from None
        missing = [name for name, node in nodes.items() if not isinstance(node, zarr.Array)]
        if missing:
            raise CacheCorrupt(self.where, f"array(s) missing: {', '.join(missing)}")
        self.arrays: dict[str, zarr.Array] = nodes
        self._check_arrays(meta)
        try:
            self.sample_ids: list[str] = [str(x) for x in self.arrays[SAMPLE_IDS][:].tolist()]
            self.offsets = {name: np.asarray(self.arrays[name][:], dtype=np.int64) for name in self.layout.offsets}
            self.checksums = np.asarray(self.arrays[CHECKSUMS][:], dtype=np.uint64)
            self.id_table = IdTable(self.arrays[ID_TABLE][:]) if self.layout.id_table else None
        except Exception as e:
            raise CacheCorrupt(self.where, f"cannot read its index ({type(e).__name__}: {e})") from None
        self._check_index()

    def _check_arrays(self, meta: RootMeta) -> None:
        pm = self.part_meta
        if pm.k != meta.k or pm.encoding != meta.encoding:
            raise CacheCorrupt(self.where, f"written with k={pm.k}, encoding={pm.encoding!r} but the cache has "
                               f"k={meta.k}, encoding={meta.encoding!r}")
        for name, array in self.arrays.items():
            want, shape = self.layout.dtype(name), self.layout.row_shape(name)
            ok = array.dtype.kind in "TUO" if want is str else array.dtype == want
            if not ok or array.shape[1:] != shape:
                dims = ", ".join(["*", *map(str, shape)])
                raise CacheCorrupt(self.where, f"array {name} is {array.dtype}{array.shape}, expected {want}({dims})")

    @property
    def checksum_salt(self) -> bytes:
        """What the part's sample checksums mix in besides the samples' arrays (see format.sample_checksum)."""
        return self.id_table.digest() if self.id_table is not None else b""

    def _check_index(self) -> None:
        n = len(self.sample_ids)
        pm = self.part_meta
        table = self.id_table.table if self.id_table is not None else np.empty(0, np.uint32)
        if len(table) and (int(table.max()) >= self.vocab_size or len(np.unique(table)) != len(table)):
            raise CacheCorrupt(self.where, f"id_table holds ids twice or ids >= vocab_size {self.vocab_size}")
        if len(self.checksums) != n:
            raise CacheCorrupt(self.where, f"{len(self.checksums)} checksums for {n} samples")
        for name, offsets in self.offsets.items():
            if len(offsets) != n + 1 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
                raise CacheCorrupt(self.where, f"{name} is not {n + 1} non-decreasing offsets from 0")
        for name in self.layout.appended:
            offsets_name = self.layout.offsets_of(name)
            end, length = int(self.offsets[offsets_name][-1]), self.arrays[name].shape[0]
            if end != length:
                raise CacheCorrupt(self.where, f"{offsets_name} ends at {end} but {name} has {length} entries")
        counts = {
            "n_samples": n,
            "n_tokens": int(self.offsets[TOKEN_OFFSETS][-1]),
            "n_prompt_tokens": int(self.offsets[PROMPT_OFFSETS][-1]),
            "n_rows": int(self.offsets[ROW_OFFSETS][-1]),
        }
        for key, value in counts.items():
            if getattr(pm, key) != value:
                raise CacheCorrupt(self.where, f"attribute {key}={getattr(pm, key)} but the arrays hold {value}")

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _chunk(self, name: str, j: int) -> np.ndarray:
        array = self.arrays[name]
        c = array.chunks[0]

        def load() -> np.ndarray:
            try:
                return array[j * c : min((j + 1) * c, array.shape[0])]
            except Exception as e:  # decompression or crc32c failure, unreadable bytes
                raise CacheCorrupt(self.where, f"cannot read {name} chunk {j} ({type(e).__name__}: {e})") from None

        return self.lru.get((self.shard, name, j), load)

    def read_range(self, name: str, start: int, stop: int) -> np.ndarray:
        """array[start:stop] assembled from cached whole chunks (a read-only view when it lies in one chunk)."""
        array = self.arrays[name]
        if stop <= start:
            return np.empty((0, *array.shape[1:]), dtype=array.dtype)
        c = array.chunks[0]
        chunks = range(start // c, (stop - 1) // c + 1)
        pieces = [self._chunk(name, j)[max(start - j * c, 0) : stop - j * c] for j in chunks]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def read_stored(self, j: int) -> dict[str, np.ndarray]:
        """Sample j's slices of the appended arrays, stored dtypes. CacheCorrupt names the sample on read
        failure."""
        out = {}
        for name in self.layout.appended:
            offsets = self.offsets[self.layout.offsets_of(name)]
            try:
                out[name] = self.read_range(name, int(offsets[j]), int(offsets[j + 1]))
            except CacheCorrupt as e:
                raise CacheCorrupt(f"{e.where} sample {self.sample_ids[j]!r}", e.detail) from None
        return out

    def decode(self, j: int, stored: dict[str, np.ndarray]) -> DecodedRows:
        """Sample j's rows (top-K or sampled) decoded from its stored arrays (CacheCorrupt when they do not fit
        together)."""
        try:
            if self.sampled is not None:
                return decode_sampled(stored, self.sampled.draws, self.row_width, self.vocab_size)
            return decode_rows(stored, self.encoding, self.k, self.vocab_size, id_table=self.id_table)
        except ValueError as e:
            raise CacheCorrupt(f"{self.where} sample {self.sample_ids[j]!r}", str(e)) from None


class CacheReader:
    """Map-style dataset over a cache's complete parts (incomplete or missing parts are reported in
    `part_status` and logged, never read). Samples are ordered by shard, then write order."""

    def __init__(self, path: str, *, storage_options: dict | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 shards: list[int] | None = None):
        """`shards`: read exactly these parts (each must be complete) instead of every complete part."""
        self._state = {"path": os.fspath(path), "storage_options": dict(storage_options or {}),
                       "cache_bytes": cache_bytes, "shards": None if shards is None else list(shards)}
        self._open()

    def _open(self) -> None:
        st = self._state
        self._location = CacheLocation(st["path"], st["storage_options"])
        root, self._meta = open_root(self._location)
        where = f"cache {self._location.path}"
        self._part_status: dict[int, PartStatus] = {s: part_status(root, s) for s in range(self._meta.num_shards)}
        if st["shards"] is None:
            st["shards"] = [s for s, status in self._part_status.items() if status == "complete"]
            others = {s: v for s, v in self._part_status.items() if v != "complete"}
            if others:
                log.warning("%s: reading %d complete part(s); not reading %d other(s): %s", where, len(st["shards"]),
                            len(others), ", ".join(f"{s:05d} {v}" for s, v in sorted(others.items())))
        for s in st["shards"]:
            if self._part_status.get(s) != "complete":
                raise UserError(f"{where}: part {s:05d} is {self._part_status.get(s, 'out of range')}, not complete")
        lru = ChunkLRU(st["cache_bytes"])
        self._encoding = get_encoding(self._meta.encoding)
        self._parts = {s: PartReader(root, s, self._meta, where, lru) for s in st["shards"]}
        self._starts = np.cumsum([0] + [len(p) for p in self._parts.values()])
        self._ids: list[str] | None = None
        self._index: dict[str, int] | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return dict(self._state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._state = state
        self._pid = None  # opened on first use in this process

    def _ensure_open(self) -> None:
        if self._pid != os.getpid():
            self._open()

    @property
    def path(self) -> str:
        return self._state["path"]

    @property
    def meta(self) -> RootMeta:
        self._ensure_open()
        return self._meta

    @property
    def encoding(self) -> Encoding:
        self._ensure_open()
        return self._encoding

    @property
    def part_status(self) -> dict[int, PartStatus]:
        """Status of every shard's part when this reader opened the cache."""
        self._ensure_open()
        return self._part_status

    @property
    def parts(self) -> list[PartReader]:
        """Readers of the parts this reader reads, in order."""
        self._ensure_open()
        return list(self._parts.values())

    def __len__(self) -> int:
        self._ensure_open()
        return int(self._starts[-1])

    @property
    def sample_ids(self) -> list[str]:
        self._ensure_open()
        if self._ids is None:
            self._ids = [sid for p in self._parts.values() for sid in p.sample_ids]
        return self._ids

    def index_of(self, sample_id: str) -> int:
        """Global index of a sample id (KeyError if absent; UserError if two parts hold it)."""
        self._ensure_open()
        if self._index is None:
            index: dict[str, int] = {}
            for i, sid in enumerate(self.sample_ids):
                if sid in index:
                    a, b = self.locate(index[sid])[0], self.locate(i)[0]
                    raise UserError(f"cache {self.path}: sample id {sid!r} appears in parts {a:05d} and {b:05d}")
                index[sid] = i
            self._index = index
        return self._index[sample_id]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, index within that part) of global sample index i."""
        self._ensure_open()
        n = int(self._starts[-1])
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        i %= n
        p = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._state["shards"][p], i - int(self._starts[p])

    def part_of(self, shard: int) -> PartReader:
        """The reader of one complete part (KeyError if this reader does not read it)."""
        self._ensure_open()
        return self._parts[shard]

    def __getitem__(self, i: int) -> CacheSample:
        shard, j = self.locate(int(i))
        part = self.part_of(shard)
        st = part.read_stored(j)
        rows = part.decode(j, st)
        return CacheSample(
            sample_id=part.sample_ids[j],
            input_ids=st[INPUT_IDS].astype(np.int64),
            loss_mask=st[LOSS_MASK].astype(bool),
            prompt_ids=st[PROMPT_IDS].astype(np.int64),
            positions=st[POSITIONS].astype(np.int64),
            topk_ids=rows.ids,
            topk_logprobs=rows.logprobs,
            topk_counts=rows.counts,
            tail_mass=rows.tail,
        )

    def prompt_ids(self, i: int) -> np.ndarray:
        """Sample i's task prompt tokens alone, as `self[i].prompt_ids` (no teacher rows read or decoded)."""
        shard, j = self.locate(int(i))
        part = self.part_of(shard)
        offsets = part.offsets[part.layout.offsets_of(PROMPT_IDS)]
        return part.read_range(PROMPT_IDS, int(offsets[j]), int(offsets[j + 1])).astype(np.int64)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
