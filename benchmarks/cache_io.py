"""Writer and reader throughput on synthetic Zipf-like rows: `python -m benchmarks.cache_io --rows 200000`.

The writer's host cost (validation + encoding + checksums + compression + writes) must stay <= 10 µs per
row at K=128 so that it never slows the teacher: that is >= 100k rows/s per process."""

from __future__ import annotations

import json
import tempfile
import time

import click
import numpy as np

from cache_schema.inspect import inspect_cache
from cache_schema.reader import CacheReader
from cache_schema.synthetic import example_root_meta, synthetic_samples
from cache_schema.writer import CacheStore


def bench(path: str, *, rows: int = 200_000, k: int = 128, vocab_size: int = 151_936, seed: int = 0,
          encoding: str = "fp16", mass_epsilon: float | None = None) -> dict:
    """Write one part of about `rows` rows at `path` (a new cache), read it back sequentially and in random
    order; rates exclude generating the data. (`benchmarks.encodings` compares every encoding.)"""
    samples = synthetic_samples(rows, k, vocab_size, seed)
    total = sum(len(s.positions) for s in samples)
    store = CacheStore.create_or_open(path, example_root_meta(k=k, vocab_size=vocab_size, num_shards=1,
                                                              encoding=encoding, mass_epsilon=mass_epsilon))
    t0 = time.perf_counter()
    with store.open_part_writer(0, owner="bench") as writer:
        for s in samples:
            writer.add(s)
    write_s = time.perf_counter() - t0

    def read(order) -> float:
        reader = CacheReader(path)
        t = time.perf_counter()
        for i in order:
            reader[int(i)]
        return time.perf_counter() - t

    seq_s = read(range(len(samples)))
    rand_s = read(np.random.default_rng(seed).permutation(len(samples)))
    info = inspect_cache(path)
    return {
        "k": k, "encoding": encoding, "mass_epsilon": mass_epsilon, "samples": len(samples), "rows": total,
        "tokens": info["tokens"],
        "write_rows_per_s": total / write_s, "write_us_per_row": write_s / total * 1e6,
        "read_sequential_rows_per_s": total / seq_s, "read_random_rows_per_s": total / rand_s,
        "bytes_per_row": info["bytes_per_row"], "topk_bytes_per_row": info["topk_bytes_per_row"],
        "compression_ratio": info["compression_ratio"],
    }


@click.command()
@click.option("--rows", default=200_000, show_default=True, help="Rows to write.")
@click.option("--k", default=128, show_default=True, help="Top-K width.")
@click.option("--path", default=None, help="Cache path to create (default: a temporary folder).")
@click.option("--encoding", default="fp16", show_default=True, help="Log-prob encoding (cache_schema.encoding).")
@click.option("--mass-epsilon", type=float, default=None, help="Mass-adaptive K: keep 1 - epsilon of each row.")
def main(rows: int, k: int, path: str | None, encoding: str, mass_epsilon: float | None) -> None:
    """Measure the cache writer's and reader's rows/s and the bytes per row on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(path or f"{tmp}/bench.zarr", rows=rows, k=k, encoding=encoding, mass_epsilon=mass_epsilon)
    rounded = {key: float(f"{v:.4g}") if isinstance(v, float) else v for key, v in result.items()}
    click.echo(json.dumps(rounded, indent=2))


if __name__ == "__main__":
    main()
