"""Rendered samples: what prepare-data hands to stage 1, one Zarr group per shard holding the cache's own token
arrays (the names, dtypes, chunking and codecs of `cache_schema.format`), so a stage-1 job reads its part and
nothing else: no source rows are parsed and no chat template is rendered again.

    manifest.rendered.zarr/
      zarr.json        attrs: RenderedMeta (format, version, tokenizer / chat template / dataset fingerprints,
                       data_config, positions, num_shards)
      parts/00017/     attrs: {shard, n_samples, n_tokens, n_prompt_tokens, n_rows}
        sample_ids (n,)  token_offsets (n+1,)  input_ids (T,) uint32  loss_mask (T,) bool
        prompt_offsets (n+1,)  prompt_ids (P,) uint32  row_offsets (n+1,)  positions (R,) uint32

`positions` are `stored_positions(loss_mask, positions)` for the mode recorded in the root. The store is built
beside its final path and renamed into place when every part is written, so a store that exists is whole.

Writing keeps memory bounded by one part, whatever the dataset: `RenderedWriter.add` appends each sample to an
append-only spill file of its shard (samples arrive in input order, spread over all shards by the id hash), and
`finish` turns one shard's spill at a time into its Zarr part.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

from cache_schema.format import (
    INPUT_IDS, LOSS_MASK, POSITIONS, PROMPT_IDS, PROMPT_OFFSETS, ROW_OFFSETS, SAMPLE_IDS, TOKEN_OFFSETS, PartArrays,
    part_path, stored_positions,
)
from common.errors import UserError

FORMAT = "hyperdistill.rendered"
VERSION = 1
# The token arrays of a cache part (k and encoding do not matter to them).
_LAYOUT = PartArrays(k=1, encoding="fp16", ragged=False)
_HEADER = struct.Struct("<III")  # id bytes, tokens, prompt tokens of one spilled sample


@dataclass(frozen=True)
class RenderedMeta:
    """The rendered store's identity: a stage-1 run must agree on all of it."""

    tokenizer_fingerprint: str
    chat_template_fingerprint: str
    dataset_fingerprint: str
    """The manifest's sha256 (cache_schema.manifest.dataset_fingerprint)."""
    data_config: dict
    """The data config the samples were prepared with."""
    positions: str
    """Mode of the stored positions ('assistant' or 'all')."""
    num_shards: int
    format: str = FORMAT
    version: int = VERSION


@dataclass(frozen=True)
class TokenSample:
    """One rendered sample as stage 1 reads it."""

    sample_id: str
    input_ids: np.ndarray  # (T,) uint32
    loss_mask: np.ndarray  # (T,) bool
    prompt_ids: np.ndarray  # (P,) uint32
    positions: np.ndarray  # (R,) uint32


class RenderedWriter:
    """Builds a rendered store at `path`: `add` samples in input order, then `finish(meta)`."""

    def __init__(self, path: str | Path, num_shards: int, positions: str):
        self.path = Path(path)
        self.num_shards = num_shards
        self.positions = positions
        self.building = self.path.with_name(self.path.name + ".building")
        self.spill = self.path.with_name(self.path.name + ".spill")
        for leftover in (self.building, self.spill):  # a killed run's
            shutil.rmtree(leftover, ignore_errors=True)
        self.spill.mkdir(parents=True)

    def _spill_file(self, shard: int) -> Path:
        return self.spill / f"{shard:05d}.bin"

    def add(self, shard: int, sample_id: str, input_ids: np.ndarray, loss_mask: np.ndarray,
            prompt_ids: np.ndarray) -> None:
        sid = sample_id.encode("utf-8")
        record = b"".join([
            _HEADER.pack(len(sid), len(input_ids), len(prompt_ids)), sid,
            np.asarray(input_ids, dtype="<u4").tobytes(), np.asarray(loss_mask, dtype=np.uint8).tobytes(),
            np.asarray(prompt_ids, dtype="<u4").tobytes(),
        ])  # fmt: skip
        with self._spill_file(shard).open("ab") as f:
            f.write(record)

    def _read_spill(self, shard: int) -> list[TokenSample]:
        path = self._spill_file(shard)
        data = path.read_bytes() if path.exists() else b""
        samples, at = [], 0
        while at < len(data):
            n_id, n_tok, n_prompt = _HEADER.unpack_from(data, at)
            at += _HEADER.size
            sid = data[at : at + n_id].decode("utf-8")
            at += n_id
            ids = np.frombuffer(data, dtype="<u4", count=n_tok, offset=at).astype(np.uint32)
            at += 4 * n_tok
            mask = np.frombuffer(data, dtype=np.uint8, count=n_tok, offset=at).astype(bool)
            at += n_tok
            prompt = np.frombuffer(data, dtype="<u4", count=n_prompt, offset=at).astype(np.uint32)
            at += 4 * n_prompt
            samples.append(TokenSample(sid, ids, mask, prompt, stored_positions(mask, self.positions)))
        return samples

    def finish(self, meta: RenderedMeta) -> None:
        """Write every part from its spill (one at a time), the root metadata, then move the store into place."""
        root = zarr.open_group(str(self.building), mode="w")
        for shard in range(self.num_shards):
            _write_part(root, shard, self._read_spill(shard))
            self._spill_file(shard).unlink(missing_ok=True)
        root.update_attributes(asdict(meta))
        old = self.path.with_name(self.path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.building, self.path)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.spill, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.building, ignore_errors=True)
        shutil.rmtree(self.spill, ignore_errors=True)


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _write_part(root: zarr.Group, shard: int, samples: list[TokenSample]) -> None:
    def cat(name: str, dtype) -> np.ndarray:
        return np.concatenate([getattr(s, name) for s in samples]).astype(dtype) if samples else np.empty(0, dtype)

    arrays = {
        SAMPLE_IDS: np.array([s.sample_id for s in samples], dtype=str) if samples else np.array([], dtype=str),
        TOKEN_OFFSETS: _offsets([len(s.input_ids) for s in samples]),
        INPUT_IDS: cat("input_ids", np.uint32),
        LOSS_MASK: cat("loss_mask", bool),
        PROMPT_OFFSETS: _offsets([len(s.prompt_ids) for s in samples]),
        PROMPT_IDS: cat("prompt_ids", np.uint32),
        ROW_OFFSETS: _offsets([len(s.positions) for s in samples]),
        POSITIONS: cat("positions", np.uint32),
    }
    group = root.create_group(part_path(shard), attributes={
        "shard": shard, "n_samples": len(samples), "n_tokens": int(arrays[TOKEN_OFFSETS][-1]),
        "n_prompt_tokens": int(arrays[PROMPT_OFFSETS][-1]), "n_rows": int(arrays[ROW_OFFSETS][-1])})  # fmt: skip
    for name, values in arrays.items():
        dtype = _LAYOUT.dtype(name)
        array = group.create_array(name, shape=values.shape, chunks=(_LAYOUT.chunk_length(name),), dtype=dtype,
                                   compressors=_LAYOUT.codecs(name), fill_value="" if dtype is str else 0,
                                   config={"write_empty_chunks": True})  # fmt: skip
        if len(values):
            array[:] = values


def read_rendered_meta(path: str | Path) -> RenderedMeta:
    """The root metadata of a rendered store; UserError when there is none or it is not one."""
    p = Path(path)
    try:
        attrs = dict(zarr.open_group(str(p), mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise UserError(f"rendered samples {p}: not found (run prepare-data first)") from None
    if attrs.get("format") != FORMAT or attrs.get("version") != VERSION:
        raise UserError(f"rendered samples {p}: not a version-{VERSION} rendered store "
                        f"(format {attrs.get('format')!r}, version {attrs.get('version')!r}); re-run prepare-data")
    try:
        return RenderedMeta(**attrs)
    except TypeError as e:
        raise UserError(f"rendered samples {p}: malformed metadata ({e}); re-run prepare-data") from None


def read_rendered_part(path: str | Path, shard: int) -> list[TokenSample]:
    """Every sample of one shard's part, in input order (reads only that part's arrays)."""
    p = Path(path)
    try:
        group = zarr.open_group(str(p), path=part_path(shard), mode="r")
        arrays = {name: group[name][:] for name in (SAMPLE_IDS, TOKEN_OFFSETS, INPUT_IDS, LOSS_MASK, PROMPT_OFFSETS,
                                                    PROMPT_IDS, ROW_OFFSETS, POSITIONS)}  # fmt: skip
    except Exception as e:  # missing part or array, corrupt chunk (crc32c)
        raise UserError(f"rendered samples {p} part {shard:05d}: cannot read ({type(e).__name__}: {e}); "
                        "re-run prepare-data") from None
    tok, prm, row = arrays[TOKEN_OFFSETS], arrays[PROMPT_OFFSETS], arrays[ROW_OFFSETS]
    return [
        TokenSample(
            sample_id=str(sid),
            input_ids=arrays[INPUT_IDS][tok[i] : tok[i + 1]],
            loss_mask=arrays[LOSS_MASK][tok[i] : tok[i + 1]],
            prompt_ids=arrays[PROMPT_IDS][prm[i] : prm[i + 1]],
            positions=arrays[POSITIONS][row[i] : row[i + 1]],
        )
        for i, sid in enumerate(arrays[SAMPLE_IDS].tolist())
    ]
