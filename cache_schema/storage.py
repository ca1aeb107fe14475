"""Where a cache lives: a local folder or an fsspec URL (s3://, gs://, memory://), and the few file
operations the cache needs beside Zarr itself (lease files, wiping a part, sizes on disk).

Local paths use `os` directly because only they give an atomic exclusive create (O_EXCL) and an
atomic rename; fsspec URLs get the closest their filesystem offers (see `lease.py`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

import zarr
import zarr.errors
import zarr.storage

from cache_schema.format import part_path
from cache_schema.metadata import RootMeta
from common.errors import UserError

PartStatus = Literal["complete", "incomplete", "missing"]


class CacheLocation:
    """A cache root plus file access relative to it. `rel` arguments are '/'-separated keys."""

    def __init__(self, path: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        text = os.fspath(path)
        if text.startswith("file://"):
            text = text[len("file://") :]
        self.is_local = "://" not in text
        self.storage_options = dict(storage_options or {})
        if self.is_local:
            self.path = str(Path(text).absolute())
            self._fs = None
            self._root = self.path
        else:
            import fsspec

            self.path = text.rstrip("/")
            try:
                self._fs, self._root = fsspec.url_to_fs(self.path, **self.storage_options)
            except (ImportError, ValueError) as e:
                raise UserError(f"cache path {self.path}: cannot open this URL ({e})") from None
            self._root = self._root.rstrip("/")

    def __repr__(self) -> str:
        return f"CacheLocation({self.path!r})"

    def zarr_store(self, read_only: bool) -> zarr.abc.store.Store:
        if self.is_local:
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.path, storage_options=self.storage_options, read_only=read_only)

    def full(self, rel: str = "") -> str:
        """The absolute local path or filesystem path of a key."""
        if not rel:
            return self._root
        return os.path.join(self._root, *rel.split("/")) if self.is_local else f"{self._root}/{rel}"

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.full(rel)) if self.is_local else self._fs.exists(self.full(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's content, or None when it does not exist."""
        try:
            if self.is_local:
                return Path(self.full(rel)).read_bytes()
            return self._fs.cat_file(self.full(rel))
        except FileNotFoundError:
            return None

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace the file's content in one step (local: write a temporary file, then rename)."""
        if not self.is_local:
            self._fs.pipe_file(self.full(rel), data)
            return
        target = self.full(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create the file only if it does not exist. Atomic on local paths (O_EXCL); on fsspec
        filesystems a check followed by a write, so two racing creators can both succeed."""
        target = self.full(rel)
        if not self.is_local:
            if self._fs.exists(target):
                return False
            self._fs.pipe_file(target, data)
            return True
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def rename(self, rel: str, new_rel: str) -> bool:
        """Move a file; False when the source no longer exists. Atomic on local paths."""
        try:
            if self.is_local:
                os.rename(self.full(rel), self.full(new_rel))
            else:
                self._fs.mv(self.full(rel), self.full(new_rel))
        except FileNotFoundError:
            return False
        return True

    def delete(self, rel: str) -> None:
        """Remove a file or folder (recursively); absent is fine."""
        target = self.full(rel)
        if self.is_local:
            if os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                try:
                    os.unlink(target)
                except FileNotFoundError:
                    pass
            return
        if self._fs.exists(target):
            self._fs.rm(target, recursive=True)

    def list_names(self, rel: str) -> list[str]:
        """Names directly inside a folder; empty when it does not exist."""
        target = self.full(rel)
        if self.is_local:
            return sorted(os.listdir(target)) if os.path.isdir(target) else []
        if not self._fs.exists(target):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(target, detail=False))

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """Bytes of every file under a folder, keyed by its path relative to that folder."""
        base = self.full(rel)
        sizes: dict[str, int] = {}
        if self.is_local:
            for folder, _, files in os.walk(base):
                for name in files:
                    full = os.path.join(folder, name)
                    sizes[os.path.relpath(full, base).replace(os.sep, "/")] = os.path.getsize(full)
            return sizes
        if not self._fs.exists(base):
            return sizes
        for p, info in self._fs.find(base, detail=True).items():
            sizes[p[len(base) :].lstrip("/")] = int(info.get("size") or 0)
        return sizes


def open_root(location: CacheLocation, *, read_only: bool = True) -> tuple[zarr.Group, RootMeta]:
    """The cache's root group and its parsed metadata (UserError when absent, malformed or of another
    schema version)."""
    try:
        group = zarr.open_group(location.zarr_store(read_only), mode="r" if read_only else "r+")
    except (FileNotFoundError, zarr.errors.NodeTypeValidationError, zarr.errors.ContainsArrayError):
        raise UserError(f"cache {location.path}: no cache there (no Zarr group)") from None
    return group, RootMeta.from_dict(dict(group.attrs), where=f"cache {location.path}")


def part_status(root: zarr.Group, shard: int) -> PartStatus:
    """'complete' once the writer's last write set complete=true; 'incomplete' when the part group exists
    without it (a writer is running or died); 'missing' when there is no part group."""
    try:
        group = zarr.open_group(root.store, path=part_path(shard), mode="r")
    except FileNotFoundError:
        return "missing"
    except ValueError:  # unreadable zarr.json: a torn or corrupt write
        return "incomplete"
    return "complete" if group.attrs.get("complete") is True else "incomplete"
