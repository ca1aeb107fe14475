"""The logit cache between stage 1 (teacher) and stage 2 (student): its format, and the code that writes,
reads, checks and describes it. One module per job:

    format        the spec: arrays, dtypes, chunking, codecs, positions, row conventions, checksums, samples
    metadata      RootMeta / PartMeta: the root and part attributes, checked when parsed
    encoding      log-prob encodings (fp16, qlog8, qlog5, qsqrt5) with their error bounds
    topk_rows     top-K rows <-> stored arrays (the quantised encodings' id table and delta coding)
    sampled_rows  sampled (RS-KD) rows <-> stored distinct ids and draw counts
    row_checks    the format's promises about rows, shared by the writer, stage 1 and verify
    storage       where a cache lives (local path or fsspec URL), opening it, part status
    lease         one writer per part
    writer        CacheStore / PartWriter (stage 1)
    reader        CacheReader (stage 2)
    verify        verify_cache: read everything back and check it
    inspect       inspect_cache / show_sample / cache_stats
    synthetic     example metadata and Zipf-like rows for tests and benchmarks

The commands over it (`hyperdistill cache ...`) are in hyperdistill.cli."""

from cache_schema.encoding import ENCODINGS, Encoding, Fp16Encoding, QuantisedLogEncoding, get_encoding
from cache_schema.format import (
    PAD_LOGPROB, SCHEMA_VERSION, CacheSample, SampleRows, sample_checksum, stored_positions, tail_mass,
)
from cache_schema.inspect import cache_stats, inspect_cache, show_sample
from cache_schema.lease import LeaseLost, PartBusy, PartLease
from cache_schema.metadata import DatasetMeta, PartMeta, RootMeta, SamplingMeta, TeacherMeta, TokenizerMeta
from cache_schema.reader import CacheCorrupt, CacheReader
from cache_schema.manifest import load_manifest_ids
from cache_schema.row_checks import check_teacher_rows
from cache_schema.verify import Problem, VerifyReport, verify_cache
from cache_schema.writer import CacheStore, PartWriter
from common.config import config_hash

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
    "check_teacher_rows",
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
