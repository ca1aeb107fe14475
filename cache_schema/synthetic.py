"""Synthetic but realistic-looking cache content, for tests and benchmarks: Zipf-shaped top-K rows and whole
samples that obey the format's conventions.

A row's probabilities follow Zipf's law over rank, p(r) ~ r**-a * exp(0.3 * noise), normalised over the whole
vocabulary (so the tail outside the top K is the Zipf tail), with a drawn per row in [1.5, 5]: from flat rows
(top-1 ~0.37, tail at K=128 ~6%) to the near-certain ones code is full of (top-1 ~0.96, tail ~1e-9); over
all rows at K=128 and vocabulary 151,936 the median top-1 is ~0.86 and the median tail ~6e-6. Ids:
frequent tokens have small ids, as in a BPE vocabulary; the probability order follows frequency only loosely;
no id twice in a row."""

from __future__ import annotations

import numpy as np

from cache_schema.format import SampleRows, stored_positions
from cache_schema.metadata import DatasetMeta, RootMeta, TeacherMeta, TokenizerMeta


ZIPF_EXPONENTS = (1.5, 5.0)


def zipf_topk_rows(rng: np.random.Generator, rows: int, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(topk_ids uint32 [rows, k], topk_logprobs float32 [rows, k]) in rank order."""
    if k > vocab_size:
        raise ValueError(f"k={k} > vocab_size={vocab_size}")
    # Distinct ids per row: increasing ranks with heavy-tailed gaps, folded into the vocabulary.
    gaps = 1 + np.floor(rng.pareto(1.2, size=(rows, k)) * 3).astype(np.int64)
    ranks = rng.integers(0, 50, size=(rows, 1)) + np.cumsum(gaps, axis=1)
    span = vocab_size - k
    if ranks.size and ranks[:, -1].max() > span:  # squeeze rows that overshoot, keeping them increasing
        over = ranks[:, -1:] > span
        scaled = (ranks - ranks[:, :1]) * (span - k) // np.maximum(ranks[:, -1:] - ranks[:, :1], 1)
        ranks = np.where(over, scaled + np.arange(k), ranks)
    # Probability order follows frequency only loosely: jitter the order within each row.
    order = np.argsort(np.arange(k) + rng.normal(0, k / 8, size=(rows, k)), axis=1)
    ids = np.take_along_axis(ranks, order, axis=1).astype(np.uint32)
    a = rng.uniform(*ZIPF_EXPONENTS, size=(rows, 1))
    log_w = -a * np.log(np.arange(1, k + 1)) + 0.3 * rng.normal(size=(rows, k))
    log_w = -np.sort(-log_w, axis=1)
    # Mass of ranks k+1..V relative to rank 1's weight: the integral of r**-a from k + 1/2 to V + 1/2.
    tail_w = ((vocab_size + 0.5) ** (1 - a) - (k + 0.5) ** (1 - a)) / (1 - a)
    top = log_w[:, :1]
    log_z = top + np.log(np.exp(log_w - top).sum(axis=1, keepdims=True) + tail_w * np.exp(-top))
    logprobs = (log_w - log_z).astype(np.float32)
    return ids, logprobs


def synthetic_sample(rng: np.random.Generator, sample_id: str, *, n_tokens: int, k: int, vocab_size: int,
                     positions: str = "assistant", assistant_fraction: float = 0.25,
                     prompt_tokens: int = 32) -> SampleRows:
    """A sample of n_tokens tokens whose assistant spans cover about `assistant_fraction` of it."""
    input_ids = rng.integers(0, vocab_size, size=n_tokens)
    mask = np.zeros(n_tokens, dtype=bool)
    span = max(1, n_tokens // 20)
    for start in rng.integers(0, n_tokens, size=max(1, int(assistant_fraction * 20))):
        mask[start : start + span] = True
    pos = stored_positions(mask, positions)
    ids, logprobs = zipf_topk_rows(rng, len(pos), k, vocab_size)
    return SampleRows(sample_id=sample_id, input_ids=input_ids, loss_mask=mask,
                      prompt_ids=rng.integers(0, vocab_size, size=prompt_tokens), positions=pos,
                      topk_ids=ids, topk_logprobs=logprobs)


def example_root_meta(*, k: int = 8, vocab_size: int = 1000, num_shards: int = 2, positions: str = "assistant",
                      encoding: str = "fp16", **overrides) -> RootMeta:
    """Root metadata for a synthetic cache (any RootMeta field can be overridden)."""
    fields = dict(
        k=k, encoding=encoding, positions=positions, vocab_size=vocab_size, num_shards=num_shards,
        teacher=TeacherMeta(model="synthetic-teacher", dtype="float32", backend="synthetic", engine_version="none"),
        tokenizer=TokenizerMeta(name="synthetic", path="", fingerprint="tok-0"),
        chat_template_fingerprint="tmpl-0",
        dataset=DatasetMeta(source="synthetic", fingerprint="data-0", filter={}),
        config={"name": "synthetic"},
    )
    fields.update(overrides)
    return RootMeta(**fields)


def synthetic_samples(rows: int, k: int, vocab_size: int, seed: int = 0) -> list[SampleRows]:
    """Samples of 2k-12k tokens (a quarter of them assistant tokens) until `rows` rows."""
    rng = np.random.default_rng(seed)
    samples, total = [], 0
    while total < rows:
        s = synthetic_sample(rng, f"traj-{len(samples)}", n_tokens=int(rng.integers(2_000, 12_000)), k=k,
                             vocab_size=vocab_size)
        samples.append(s)
        total += len(s.positions)
    return samples
