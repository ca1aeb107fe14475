"""One writer per part: a lease file `parts/NNNNN/writer.lease` holding owner, host, pid, a random token
and an expiry time. (`Lease` is the mechanism for any one file; stage 2 leases its train.output_dir with it.)

- Claim: the file is created exclusively (O_EXCL on local paths, so two claimants cannot both win).
- A live lease held by another owner -> `PartBusy`. The same owner may re-claim (a restarted worker).
- Stale lease: on the same host, its pid is dead (expiry is ignored: the pid is the better witness);
  on another host, its expiry has passed. A stale lease is taken over by renaming it aside (atomic on
  local paths: of two claimants exactly one moves it) and then claiming as above.
- Renewed (expiry pushed forward) as the writer makes progress, at most every ttl/4; a renewal or the
  final check that finds someone else's token raises `LeaseLost`, so the loser never marks the part done.
- Released (deleted, if still ours) when the writer exits.

fsspec URLs (s3://, gs://, memory://): best effort. Object stores have no exclusive create or atomic
rename here, so a claim is write-then-read-back: two claimants racing within one round trip can both
believe they won, and the later writer's token check then fails at its next renewal. Give each shard
to one process in the job plan; the lease guards against mistakes and crashed jobs, not against a
planned race.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

from cache_schema.format import LEASE_FILE
from cache_schema.storage import CacheLocation
from common.errors import UserError

LEASE_TTL_S = 600.0


class PartBusy(UserError):
    """Another live owner holds the lease (of a part, or whatever the `Lease` guards)."""


class LeaseLost(UserError):
    """Our lease was taken over (it had gone stale) while we were writing."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child that nobody reaped yet still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True, kw_only=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    token: str
    expires: float
    """Unix time after which other hosts may take the lease over."""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """None for an unreadable record (a writer died mid-write): such a lease counts as stale."""
        try:
            d = json.loads(data)
            return cls(owner=str(d["owner"]), host=str(d["host"]), pid=int(d["pid"]), token=str(d["token"]),
                       expires=float(d["expires"]))
        except (ValueError, KeyError, TypeError):
            return None

    def is_stale(self, now: float) -> bool:
        if self.host == socket.gethostname():
            return not _pid_alive(self.pid)
        return self.expires < now

    def describe(self) -> str:
        return f"owner {self.owner!r} (host {self.host}, pid {self.pid}, expires {time.ctime(self.expires)})"


class Lease:
    """The lease file `key` under `location`, guarding what `where` names (in messages). Use as a context
    manager or call acquire() / release(); renew_if_due() on progress; check() before committing work."""

    def __init__(self, location: CacheLocation, key: str, owner: str, ttl_s: float = LEASE_TTL_S, *, where: str):
        if not owner:
            raise UserError("lease owner must be a non-empty string")
        if ttl_s <= 0:
            raise UserError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.location = location
        self.key = key
        self.where = where
        self.owner = owner
        self.ttl_s = ttl_s
        self.record: LeaseRecord | None = None
        self._renewed_at = 0.0

    def _new_record(self) -> LeaseRecord:
        return LeaseRecord(owner=self.owner, host=socket.gethostname(), pid=os.getpid(),
                           token=uuid.uuid4().hex, expires=time.time() + self.ttl_s)

    def _read(self, key: str | None = None) -> tuple[bool, LeaseRecord | None]:
        """(exists, record); record is None when the file exists but cannot be parsed."""
        data = self.location.read_bytes(key or self.key)
        return (False, None) if data is None else (True, LeaseRecord.from_bytes(data))

    def _where(self) -> str:
        return self.where

    def acquire(self) -> None:
        """Claim the lease or raise PartBusy naming the holder."""
        for _ in range(5):
            record = self._new_record()
            if self.location.create_exclusive(self.key, record.to_bytes()):
                if not self.location.is_local:  # no exclusive create: read back to see who won
                    _, current = self._read()
                    if current is None or current.token != record.token:
                        continue
                self.record, self._renewed_at = record, time.monotonic()
                return
            exists, current = self._read()
            if not exists:
                continue  # released between our create and read: try again
            if current is not None and current.owner != self.owner and not current.is_stale(time.time()):
                raise PartBusy(f"{self._where()} is being written by {current.describe()}")
            self._take_over(current)
        raise PartBusy(f"{self._where()}: lost the race for its lease 5 times; another writer is claiming it")

    def _take_over(self, stale: LeaseRecord | None) -> None:
        """Move a stale lease aside; if what we moved was not the record we judged stale (someone claimed
        the part in between), put it back and report the part busy."""
        aside = f"{self.key}.{uuid.uuid4().hex}.stale"
        if not self.location.rename(self.key, aside):
            return  # someone else moved it first; the caller retries the claim
        _, moved = self._read(aside)
        if moved is not None and (stale is None or moved.token != stale.token):
            if not self.location.exists(self.key):
                self.location.rename(aside, self.key)
            self.location.delete(aside)
            raise PartBusy(f"{self._where()} was just claimed by {moved.describe()}")
        self.location.delete(aside)

    def check(self) -> None:
        """Raise LeaseLost unless the lease file still holds our token."""
        if self.record is None:
            raise LeaseLost(f"{self._where()}: lease not held")
        _, current = self._read()
        if current is None or current.token != self.record.token:
            holder = current.describe() if current else "nobody"
            raise LeaseLost(f"{self._where()}: our lease was taken over; now held by {holder}")

    def renew(self) -> None:
        """Push the expiry forward (after checking the lease is still ours)."""
        self.check()
        assert self.record is not None
        self.record = LeaseRecord(**{**asdict(self.record), "expires": time.time() + self.ttl_s})
        self.location.write_atomic(self.key, self.record.to_bytes())
        self._renewed_at = time.monotonic()

    def renew_if_due(self) -> None:
        if time.monotonic() - self._renewed_at > self.ttl_s / 4:
            self.renew()

    def release(self) -> None:
        """Delete the lease file if it is still ours."""
        if self.record is None:
            return
        _, current = self._read()
        if current is not None and current.token == self.record.token:
            self.location.delete(self.key)
        self.record = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class PartLease(Lease):
    """The lease on one part folder (`part_rel`, e.g. 'parts/00017'): its writer.lease file."""

    def __init__(self, location: CacheLocation, part_rel: str, owner: str, ttl_s: float = LEASE_TTL_S):
        super().__init__(location, f"{part_rel}/{LEASE_FILE}", owner, ttl_s, where=f"cache {location.path} {part_rel}")
