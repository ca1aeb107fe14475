"""The logit cache between stage 1 (teacher) and stage 2 (student): format, writer, reader, checks, CLI.

Layout and conventions: `cache_schema.layout`. Stage 1 writes with `CacheStore` / `PartWriter`; stage 2
reads with `CacheReader`; `verify_cache` and `inspect_cache` check and describe a cache."""

from cache_schema.encoding import ENCODINGS, Encoding, Fp16Encoding, QuantisedLogEncoding, get_encoding
from cache_schema.inspect import cache_stats, inspect_cache, show_sample
from cache_schema.layout import (
    PAD_LOGPROB, SCHEMA_VERSION, CacheSample, DatasetMeta, PartMeta, RootMeta, SampleRows, SamplingMeta, TeacherMeta,
    TokenizerMeta, config_hash, sample_checksum, stored_positions, tail_mass,
)
from cache_schema.lease import LeaseLost, PartBusy, PartLease
from cache_schema.reader import CacheCorrupt, CacheReader
from cache_schema.manifest import load_manifest_ids
from cache_schema.verify import Problem, VerifyReport, verify_cache
from cache_schema.writer import CacheStore, PartWriter

__all__ = [
    "ENCODINGS",
    "PAD_LOGPROB",
    "SCHEMA_VERSION",
    "CacheCorrupt",
    "CacheReader",
    "CacheSample",
    "CacheStore",
    "DatasetMeta",
    "Encoding",
    "Fp16Encoding",
    "LeaseLost",
    "PartBusy",
    "PartLease",
    "PartMeta",
    "PartWriter",
    "Problem",
    "QuantisedLogEncoding",
    "RootMeta",
    "SampleRows",
    "SamplingMeta",
    "TeacherMeta",
    "TokenizerMeta",
    "VerifyReport",
    "cache_stats",
    "config_hash",
    "get_encoding",
    "inspect_cache",
    "load_manifest_ids",
    "sample_checksum",
    "show_sample",
    "stored_positions",
    "tail_mass",
    "verify_cache",
]
