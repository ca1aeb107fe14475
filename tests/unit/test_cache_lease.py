"""One writer per part: a held lease refuses a second claim (across processes); a stale one is taken over."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import uuid

import numpy as np
import pytest

from cache_schema import CacheStore, PartBusy, PartLease
from cache_schema.format import LEASE_FILE, part_path
from cache_schema.lease import LeaseRecord
from cache_schema.storage import CacheLocation
from cache_schema.synthetic import example_root_meta, synthetic_sample

CTX = mp.get_context("fork")  # cheap children; they only touch lease files


def _hold(path: str, owner: str, claimed, release) -> None:
    lease = PartLease(CacheLocation(path), part_path(0), owner)
    lease.acquire()
    claimed.set()
    release.wait(30)
    lease.release()


def _claim_and_die(path: str, owner: str) -> None:
    PartLease(CacheLocation(path), part_path(0), owner).acquire()
    os._exit(0)  # no release: the lease file stays behind with a dead pid


def test_second_claim_of_a_held_part_fails_until_released(tmp_path):
    path = str(tmp_path)
    claimed, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold, args=(path, "worker-A", claimed, release))
    holder.start()
    try:
        assert claimed.wait(30)
        with pytest.raises(PartBusy, match="worker-A") as e:
            PartLease(CacheLocation(path), part_path(0), "worker-B").acquire()
        assert f"pid {holder.pid}" in str(e.value) and part_path(0) in str(e.value)
    finally:
        release.set()
        holder.join(30)
    with PartLease(CacheLocation(path), part_path(0), "worker-B") as lease:
        assert lease.record.owner == "worker-B"


def test_lease_of_a_dead_process_is_taken_over(tmp_path):
    path = str(tmp_path)
    child = CTX.Process(target=_claim_and_die, args=(path, "worker-A"))
    child.start()
    child.join(30)
    key = f"{part_path(0)}/{LEASE_FILE}"
    left = LeaseRecord.from_bytes(CacheLocation(path).read_bytes(key))
    assert left.owner == "worker-A" and left.pid == child.pid and left.expires > time.time()  # not expired: pid decides
    lease = PartLease(CacheLocation(path), part_path(0), "worker-B")
    lease.acquire()
    now = LeaseRecord.from_bytes(CacheLocation(path).read_bytes(key))
    assert now.owner == "worker-B" and now.pid == os.getpid()
    assert [n for n in os.listdir(tmp_path / part_path(0)) if n != LEASE_FILE] == []  # the stale one was removed
    lease.release()
    assert not (tmp_path / key).exists()


def _foreign(path: str, expires: float) -> None:
    record = LeaseRecord(owner="other-node", host="some-other-host", pid=1, token="t", expires=expires)
    CacheLocation(path).write_atomic(f"{part_path(0)}/{LEASE_FILE}", record.to_bytes())


def test_lease_from_another_host_counts_until_it_expires(tmp_path):
    path = str(tmp_path)
    _foreign(path, expires=time.time() + 600)
    with pytest.raises(PartBusy, match="other-node"):
        PartLease(CacheLocation(path), part_path(0), "me").acquire()
    _foreign(path, expires=time.time() - 1)
    lease = PartLease(CacheLocation(path), part_path(0), "me")
    lease.acquire()
    assert lease.record.owner == "me"


def test_same_owner_may_reclaim_and_renewal_extends(tmp_path):
    path = str(tmp_path)
    first = PartLease(CacheLocation(path), part_path(0), "worker-A", ttl_s=60)
    first.acquire()
    second = PartLease(CacheLocation(path), part_path(0), "worker-A", ttl_s=60)
    second.acquire()  # a restarted worker with the same name
    key = f"{part_path(0)}/{LEASE_FILE}"
    before = json.loads(CacheLocation(path).read_bytes(key))["expires"]
    time.sleep(0.01)
    second.renew()
    assert json.loads(CacheLocation(path).read_bytes(key))["expires"] > before
    first.release()  # not first's any more: must not delete second's lease
    assert CacheLocation(path).exists(key)


def test_unreadable_lease_file_counts_as_stale(tmp_path):
    location = CacheLocation(str(tmp_path))
    location.write_atomic(f"{part_path(0)}/{LEASE_FILE}", b"{not json")
    lease = PartLease(location, part_path(0), "me")
    lease.acquire()
    assert lease.record.owner == "me"


def test_memory_url_leases():
    location = CacheLocation(f"memory://lease-{uuid.uuid4().hex}/c.zarr")
    first = PartLease(location, part_path(0), "worker-A")
    first.acquire()
    with pytest.raises(PartBusy, match="worker-A"):
        PartLease(location, part_path(0), "worker-B").acquire()
    first.release()
    PartLease(location, part_path(0), "worker-B").acquire()


def test_writer_refuses_a_part_held_by_another_process(tmp_path):
    path = str(tmp_path / "c.zarr")
    store = CacheStore.create_or_open(path, example_root_meta(num_shards=1))
    claimed, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold, args=(path, "worker-A", claimed, release))
    holder.start()
    try:
        assert claimed.wait(30)
        with pytest.raises(PartBusy):
            with store.open_part_writer(0, "worker-B"):
                pass
        assert store.part_status(0) == "missing"  # the refused writer touched nothing
    finally:
        release.set()
        holder.join(30)


def test_writer_renews_its_lease_as_it_adds(tmp_path):
    store = CacheStore.create_or_open(str(tmp_path / "c.zarr"), example_root_meta(num_shards=1))
    key = f"{part_path(0)}/{LEASE_FILE}"
    rng = np.random.default_rng(0)
    with store.open_part_writer(0, "me", lease_ttl_s=0.4) as w:
        first = LeaseRecord.from_bytes(store.location.read_bytes(key)).expires
        time.sleep(0.15)  # more than ttl/4 since the claim
        w.add(synthetic_sample(rng, "a", n_tokens=30, k=8, vocab_size=1000))
        assert LeaseRecord.from_bytes(store.location.read_bytes(key)).expires > first
    assert store.part_status(0) == "complete"
