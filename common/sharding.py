"""Stable assignment of samples to cache shards and to the held-out split.

Both are functions of the sample id alone (blake2b, never Python's salted `hash()`), so every process,
machine and re-run agrees. The two use different blake2b personalisations, so which samples are held
out is independent of which shard they land in.
"""

from __future__ import annotations

import hashlib

_SHARD_PERSON = b"hd-shard"
_HELDOUT_PERSON = b"hd-heldout"


def _hash64(sample_id: str, person: bytes) -> int:
    digest = hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big")


def shard_of(sample_id: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) that holds this sample."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return _hash64(sample_id, _SHARD_PERSON) % num_shards


def is_heldout(sample_id: str, fraction: float) -> bool:
    """True for about `fraction` of all ids: those kept out of training for evaluation."""
    return _hash64(sample_id, _HELDOUT_PERSON) < fraction * 2**64
