"""Writing a cache: `CacheStore` creates or opens the root; `PartWriter` writes one shard's part.

    store = CacheStore.create_or_open(path, root_meta)
    if store.part_status(shard) != "complete":
        with store.open_part_writer(shard, owner=f"{host}:{pid}") as w:
            for sample in rows:              # SampleRows, one per trajectory
                w.add(sample)
            w.finish({"timings": {"teacher_s": t}})

Memory stays bounded: appended arrays are buffered a few chunks at a time and written as whole chunks;
only the per-sample index (ids, offsets, checksums: ~40 bytes a sample) is kept until the end. With the
quantised encodings the first ID_TABLE_ROWS rows are also held back until their ids have made the part's
id table (cache_schema.topk_rows.IdTable), which all of the part's rows are encoded against.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import replace
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import zarr

from cache_schema.encoding import Encoding, get_encoding
from cache_schema.format import (
    CHECKSUMS, DEFAULT_CHUNK_BYTES, DRAW_COUNTS, ENTRY_OFFSETS, ID_TABLE, INPUT_IDS, LEASE_FILE, LOSS_MASK,
    PARTS_GROUP, POSITIONS, PROMPT_IDS, PROMPT_OFFSETS, ROW_OFFSETS, SAMPLE_IDS, TOKEN_OFFSETS, TOPK_COUNTS, TOPK_IDS,
    TOPK_LOGPROBS, SampleRows, part_arrays, part_path, sample_checksum, stored_positions,
)
from cache_schema.lease import LEASE_TTL_S, PartLease
from cache_schema.metadata import PartMeta, RootMeta
from cache_schema.row_checks import check_teacher_rows
from cache_schema.sampled_rows import count_draws
from cache_schema.storage import CacheLocation, PartStatus, open_root, part_status
from cache_schema.topk_rows import IdTable, encode_rows
from common.config import config_hash
from common.errors import UserError

# Whole chunks written per flush of a buffer: several at once lets Zarr compress them on parallel threads.
CHUNKS_PER_FLUSH = 4
# Rows whose top-K ids make a part's id table (quantised encodings): 16 MiB held back at K=128. Ids first
# seen later are stored escaped (topk_rows.IdTable), which costs a few bytes each.
ID_TABLE_ROWS = 16384
# SampleRows' field of a sampled row's draws, and its key among a validated sample's arrays until encoded.
_DRAWS = "draws"


class CacheStore:
    """An open cache for writing. Get one with `create_or_open`."""

    def __init__(self, location: CacheLocation, root: zarr.Group, meta: RootMeta, run_meta: RootMeta):
        self.location = location
        self.root = root
        self.meta = meta
        """The metadata stored in the cache (from the run that created it)."""
        self.run_meta = run_meta
        """This run's metadata: its config hash and engine version go into the parts it writes."""

    @property
    def path(self) -> str:
        return self.location.path

    @classmethod
    def create_or_open(cls, path: str, root: RootMeta, *, storage_options: dict | None = None) -> CacheStore:
        """Create the cache with `root` as its metadata, or open an existing one after checking that it was
        made with the same K, encoding, positions, vocabulary, shard count, tokenizer, chat template, data
        and teacher (UserError naming the first differing field and both values)."""
        location = CacheLocation(path, storage_options)
        try:
            group, stored = open_root(location, read_only=False)
        except UserError:
            if location.list_names(""):
                if not location.exists("zarr.json"):
                    raise UserError(f"cache {location.path}: exists and is not a cache; use a new path") from None
                raise  # a cache of another schema version, or malformed metadata
            group, stored = cls._create(location, root)
        stored.require_same(root, location.path)
        return cls(location, group, stored, root)

    @staticmethod
    def existing_meta(path: str, *, storage_options: dict | None = None) -> RootMeta | None:
        """The stored metadata of the cache at `path`, None when nothing is there yet; UserError when what is
        there is not a cache this code reads. Lets a run compare its settings before it starts any work."""
        location = CacheLocation(path, storage_options)
        if not location.list_names(""):
            return None
        if not location.exists("zarr.json"):
            raise UserError(f"cache {location.path}: exists and is not a cache; use a new path")
        return open_root(location)[1]

    @staticmethod
    def _create(location: CacheLocation, root: RootMeta) -> tuple[zarr.Group, RootMeta]:
        store = location.zarr_store(read_only=False)
        try:
            group = zarr.open_group(store, mode="w-", attributes=root.to_dict())
            group.require_group(PARTS_GROUP)
        except FileExistsError:  # another process created it first: use theirs
            return open_root(location, read_only=False)
        return group, root

    def _check_shard(self, shard: int) -> None:
        if not (isinstance(shard, int) and 0 <= shard < self.meta.num_shards):
            raise UserError(f"cache {self.path}: shard {shard!r} out of range 0..{self.meta.num_shards - 1}")

    def part_status(self, shard: int) -> PartStatus:
        """'complete' | 'incomplete' | 'missing' (see storage.part_status)."""
        self._check_shard(shard)
        return part_status(self.root, shard)

    def open_part_writer(self, shard: int, owner: str, *, lease_ttl_s: float = LEASE_TTL_S,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> PartWriter:
        """A writer for one shard's part; entering it claims the part's lease (PartBusy if another live
        owner holds it) and deletes whatever a previous writer left there."""
        self._check_shard(shard)
        return PartWriter(self, shard, owner, lease_ttl_s=lease_ttl_s, chunk_bytes=chunk_bytes)


class _BackgroundWrites:
    """Zarr writes on one worker thread, in submission order, at most `max_pending` queued: compression
    (which releases the GIL) and store round trips overlap with the caller's next samples. A failed write
    surfaces at the next submit() or at drain()."""

    def __init__(self, max_pending: int = 4):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.max_pending):
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn, *args))

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _write_rows(array: zarr.Array, start: int, data: np.ndarray) -> None:
    end = start + len(data)
    array.resize((end, *array.shape[1:]))
    array[start:end] = data


class _Appender:
    """Appends along axis 0 of one Zarr array: buffers CHUNKS_PER_FLUSH whole chunks and hands them to the
    background writer whole, so no chunk is written twice (only the last, partial one waits for close)."""

    def __init__(self, array: zarr.Array, chunk_len: int, writes: _BackgroundWrites):
        self.array = array
        self.writes = writes
        self.capacity = chunk_len * CHUNKS_PER_FLUSH
        self.buffer = np.empty((self.capacity, *array.shape[1:]), dtype=array.dtype)
        self.fill = 0
        self.written = 0

    def append(self, data: np.ndarray) -> None:
        start = 0
        while start < len(data):
            n = min(len(data) - start, self.capacity - self.fill)
            self.buffer[self.fill : self.fill + n] = data[start : start + n]
            self.fill += n
            start += n
            if self.fill == self.capacity:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        # The background write owns the filled buffer; continue in a fresh one.
        self.writes.submit(_write_rows, self.array, self.written, self.buffer[: self.fill])
        self.buffer = np.empty_like(self.buffer)
        self.written += self.fill
        self.fill = 0


class PartWriter:
    """Writes one part. Use as a context manager; see the module docstring."""

    def __init__(self, store: CacheStore, shard: int, owner: str, *, lease_ttl_s: float, chunk_bytes: int):
        self.store = store
        self.shard = shard
        self.owner = owner
        self.rel = part_path(shard)
        self.meta = store.meta
        self.encoding: Encoding = get_encoding(store.meta.encoding)
        self.arrays = part_arrays(store.meta)
        self.chunk_bytes = chunk_bytes
        self.lease = PartLease(store.location, self.rel, owner, ttl_s=lease_ttl_s)
        self.group: zarr.Group | None = None
        self.finished: PartMeta | None = None
        self._ids: list[str] = []
        self._seen: set[str] = set()
        # Each offsets array and the appended array whose lengths it accumulates.
        self._counted = {TOKEN_OFFSETS: INPUT_IDS, PROMPT_OFFSETS: PROMPT_IDS, ROW_OFFSETS: POSITIONS}
        if self.arrays.ragged:
            self._counted[ENTRY_OFFSETS] = TOPK_IDS
        self._offsets = {name: [0] for name in self._counted}
        self._checksums: list[int] = []
        self._id_table: IdTable | None = None
        self._salt = b""
        self._held: list[tuple[str, dict[str, np.ndarray]]] = []  # validated samples waiting for the id table
        self._held_rows = 0
        self._appenders: dict[str, _Appender] = {}
        # The arrays as created, with write_empty_chunks on: a handle re-opened from the group gets zarr's
        # default (off), and then a chunk equal to the fill value (the offsets [0] of an empty part, a run of
        # zero-row samples) is never written and the complete part fails verify's chunks_missing check.
        self._zarrays: dict[str, zarr.Array] = {}
        self._writes = _BackgroundWrites()
        self._busy_s = 0.0
        self._opened_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> PartWriter:
        self.lease.acquire()
        try:
            self._start()
        except BaseException:
            self._writes.close()
            self.lease.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.finished is None:
                self.finish()
        finally:
            self._writes.close()
            self.lease.release()

    def _start(self) -> None:
        self._opened_at = time.monotonic()
        # Remove a previous writer's leftovers (its zarr.json first, so the part reads as missing meanwhile).
        names = [n for n in self.store.location.list_names(self.rel) if not n.startswith(LEASE_FILE)]
        for name in sorted(names, key=lambda n: n != "zarr.json"):
            self.store.location.delete(f"{self.rel}/{name}")
        self.group = zarr.create_group(self.store.root.store, path=self.rel,
                                       attributes=self._part_meta(complete=False).to_dict())
        layout = self.arrays
        for name in layout.all:
            chunk_len = layout.chunk_length(name, self.chunk_bytes)
            dtype = layout.dtype(name)
            array = self.group.create_array(
                name, shape=(0, *layout.row_shape(name)), chunks=(chunk_len, *layout.row_shape(name)), dtype=dtype,
                compressors=layout.codecs(name), fill_value="" if dtype is str else 0,
                config={"write_empty_chunks": True},
            )
            self._zarrays[name] = array
            if name in layout.appended:
                self._appenders[name] = _Appender(array, chunk_len, self._writes)

    def _part_meta(self, complete: bool, timings: dict | None = None, extra: dict | None = None) -> PartMeta:
        offs = self._offsets
        return PartMeta(
            complete=complete, shard=self.shard, owner=self.owner, k=self.meta.k, encoding=self.meta.encoding,
            n_samples=len(self._ids), n_tokens=offs[TOKEN_OFFSETS][-1], n_prompt_tokens=offs[PROMPT_OFFSETS][-1],
            n_rows=offs[ROW_OFFSETS][-1], config_hash=config_hash(self.store.run_meta.config),
            engine_version=self.store.run_meta.teacher.engine_version, timings=timings or {}, extra=extra or {},
        )

    # -- writing -----------------------------------------------------------------------------

    def add(self, sample: SampleRows) -> None:
        """Validate one sample (UserError naming it on any problem), encode it and append it."""
        if self.group is None or self.finished is not None:
            raise RuntimeError("PartWriter.add outside its `with` block or after finish()")
        t0 = time.perf_counter()
        arrays = self._validated(sample)
        self._seen.add(sample.sample_id)
        if self.arrays.id_table and self._id_table is None:
            self._held.append((sample.sample_id, arrays))
            self._held_rows += len(arrays[POSITIONS])
            if self._held_rows >= ID_TABLE_ROWS:
                self._start_id_table()
        else:
            self._append(sample.sample_id, arrays)
        self.lease.renew_if_due()
        self._busy_s += time.perf_counter() - t0

    def _start_id_table(self) -> None:
        """Make the part's id table from the held samples' top-K ids, store it, and append them."""
        ids = [arrays[TOPK_IDS] for _, arrays in self._held]
        self._id_table = IdTable.from_ids(np.concatenate([a.ravel() for a in ids]) if ids else np.empty(0))
        self._salt = self._id_table.digest()
        table = self._zarrays[ID_TABLE]
        table.resize((len(self._id_table.table),))
        if len(self._id_table.table):
            table[:] = self._id_table.table
        held, self._held = self._held, []
        for sample_id, arrays in held:
            self._append(sample_id, arrays)

    def _append(self, sample_id: str, arrays: dict[str, np.ndarray]) -> None:
        """Encode a validated sample's rows and append everything."""
        if self.arrays.sampled:
            arrays[TOPK_COUNTS], arrays[TOPK_IDS], arrays[DRAW_COUNTS] = count_draws(arrays.pop(_DRAWS))
        else:
            arrays.update(encode_rows(arrays[TOPK_IDS], arrays[TOPK_LOGPROBS], self.encoding,
                                      epsilon=self.meta.mass_epsilon, exact_mass=self.arrays.exact_mass,
                                      id_table=self._id_table))
        for name, appender in self._appenders.items():
            appender.append(arrays[name])
        self._ids.append(sample_id)
        for offsets, name in self._counted.items():
            self._offsets[offsets].append(self._offsets[offsets][-1] + len(arrays[name]))
        self._checksums.append(sample_checksum(sample_id, arrays, self.arrays.appended,
                                               sha256=self.arrays.sha256_checksums, salt=self._salt))

    def _validated(self, s: SampleRows) -> dict[str, np.ndarray]:
        """The sample's arrays in their stored dtypes (top-K ids as uint32, log-probs as float32, not yet
        encoded; or the draws as int64 under _DRAWS), after every check the format promises."""
        sid = s.sample_id
        where = f"cache {self.store.path} part {self.shard:05d}: sample {sid!r}"
        if not isinstance(sid, str) or not sid:
            raise UserError(f"cache {self.store.path} part {self.shard:05d}: sample_id must be a non-empty string, "
                            f"got {sid!r}")
        if sid in self._seen:
            raise UserError(f"{where}: added twice to this part")
        vocab, k = self.meta.vocab_size, self.meta.k

        def integers(name: str, shape: tuple, token_ids: bool = True) -> np.ndarray:
            a = np.asarray(getattr(s, name))
            if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
                want = ", ".join("?" if d is None else str(d) for d in shape)
                raise UserError(f"{where}: {name} has shape {a.shape}, expected ({want})")
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise UserError(f"{where}: {name} must hold integers, got dtype {a.dtype}")
            if a.size and token_ids and (a.min() < 0 or a.max() >= vocab):
                raise UserError(f"{where}: {name} holds ids outside [0, {vocab}): min {a.min()}, max {a.max()}")
            return a

        input_ids = integers(INPUT_IDS, (None,))
        n_tokens = len(input_ids)
        if n_tokens == 0:
            raise UserError(f"{where}: input_ids is empty")
        mask = np.asarray(s.loss_mask)
        if mask.shape != (n_tokens,):
            raise UserError(f"{where}: loss_mask has shape {mask.shape}, expected ({n_tokens},) like input_ids")
        if mask.dtype != np.bool_:
            if not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
                raise UserError(f"{where}: loss_mask must be bool (or 0/1 integers), got dtype {mask.dtype}")
            mask = mask.astype(bool)
        prompt_ids = integers(PROMPT_IDS, (None,))
        positions = integers(POSITIONS, (None,), token_ids=False)
        expected = stored_positions(mask, self.meta.positions)
        if not np.array_equal(positions, expected):
            raise UserError(
                f"{where}: positions differ from stored_positions(loss_mask, {self.meta.positions!r}) "
                f"({len(positions)} given, {len(expected)} expected; the row at t predicts token t+1, so t < T-1)"
            )
        rows = len(positions)
        arrays = {
            INPUT_IDS: input_ids.astype(np.uint32, copy=False),
            LOSS_MASK: mask,
            PROMPT_IDS: prompt_ids.astype(np.uint32, copy=False),
            POSITIONS: positions.astype(np.uint32, copy=False),
        }
        given = [name for name in (TOPK_IDS, TOPK_LOGPROBS, _DRAWS) if getattr(s, name) is not None]
        sampling = self.meta.sampled
        if sampling is not None:
            if given != [_DRAWS]:
                raise UserError(f"{where}: this cache stores sampled rows: give draws (and not topk_ids or "
                                f"topk_logprobs); got {', '.join(given) or 'none of them'}")
            draws = integers(_DRAWS, (rows, sampling.draws), token_ids=False)
            if draws.size and (draws.min() < -1 or draws.max() >= vocab):
                raise UserError(f"{where}: draws holds values outside [-1, {vocab}): min {draws.min()}, "
                                f"max {draws.max()}")
            if sampling.support_k is None and (draws == -1).any():
                raise UserError(f"{where}: draws holds -1 (a draw outside the teacher's top-K) but this cache's "
                                "support is 'full': every draw must be a token")
            arrays[_DRAWS] = draws.astype(np.int64, copy=False)
            return arrays
        if given != [TOPK_IDS, TOPK_LOGPROBS]:
            raise UserError(f"{where}: this cache stores top-K rows: give topk_ids and topk_logprobs (and not "
                            f"draws); got {', '.join(given) or 'none of them'}")
        topk_ids = integers(TOPK_IDS, (rows, k))
        lp = np.asarray(s.topk_logprobs)
        if lp.shape != (rows, k):
            raise UserError(f"{where}: topk_logprobs has shape {lp.shape}, expected ({rows}, {k})")
        if lp.size:
            if not np.issubdtype(lp.dtype, np.floating):
                raise UserError(f"{where}: topk_logprobs must be floating point, got dtype {lp.dtype}")
            check_teacher_rows(topk_ids, lp.astype(np.float32, copy=False), vocab, positions, where,
                               min_value=self.encoding.min_value, encoding=self.encoding.name)
        arrays[TOPK_IDS] = topk_ids.astype(np.uint32, copy=False)
        arrays[TOPK_LOGPROBS] = lp.astype(np.float32, copy=False)
        return arrays

    def finish(self, extra_attrs: dict[str, Any] | None = None) -> PartMeta:
        """Write the rest and mark the part complete (the very last write). Called automatically on a clean
        exit from the `with` block. `extra_attrs` (JSON-serialisable): 'config_hash' and 'engine_version' set
        those PartMeta fields (default: from this run's RootMeta); 'timings' (name -> seconds) joins the
        writer's own timings; anything else goes to PartMeta.extra. The counts cannot be set."""
        if self.group is None or self.finished is not None:
            raise RuntimeError("PartWriter.finish outside its `with` block or called twice")
        where = f"cache {self.store.path} part {self.shard:05d}: finish()"
        extra = dict(extra_attrs or {})
        fields = {key: extra.pop(key) for key in ("config_hash", "engine_version") if key in extra}
        timings = dict(extra.pop("timings", None) or {})
        owned = sorted(set(extra) & set(PartMeta.__dataclass_fields__))
        if owned:
            raise UserError(f"{where} {', '.join(owned)} are written by the writer itself")
        try:
            json.dumps([fields, extra, timings])
        except (TypeError, ValueError) as e:
            raise UserError(f"{where} attributes are not JSON ({e})") from None
        t0 = time.perf_counter()
        if self.arrays.id_table and self._id_table is None:
            self._start_id_table()
        for appender in self._appenders.values():
            appender.flush()
        self._writes.drain()
        n = len(self._ids)
        small = {
            SAMPLE_IDS: np.array(self._ids, dtype=str) if n else np.array([], dtype=str),
            CHECKSUMS: np.array(self._checksums, dtype=np.uint64),
            **{name: np.array(v, dtype=np.int64) for name, v in self._offsets.items()},
        }
        for name, values in small.items():
            array = self._zarrays[name]
            array.resize((len(values),))
            if len(values):
                array[:] = values
        self._busy_s += time.perf_counter() - t0
        timings.update(writer_busy_s=round(self._busy_s, 4), writer_wall_s=round(time.monotonic() - self._opened_at, 4))
        meta = replace(self._part_meta(complete=False, timings=timings, extra=extra), **fields)
        self.group.update_attributes(meta.to_dict())
        self.lease.check()  # never mark complete a part that another writer has taken over
        done = replace(meta, complete=True)
        self.group.update_attributes({"complete": True})
        self.finished = done
        return done
