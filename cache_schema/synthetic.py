"""Synthetic but realistic-looking cache content, for tests and benchmarks: Zipf-like top-K rows (frequent
tokens have small ids, as in a BPE vocabulary; no id twice in a row; log-probs sorted, a tail of 0.1%-30%)
and whole samples that obey the format's conventions."""

from __future__ import annotations

import numpy as np

from cache_schema.layout import DatasetMeta, RootMeta, SampleRows, TeacherMeta, TokenizerMeta, stored_positions


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
    temperature = rng.uniform(0.2, 3.0, size=(rows, 1))
    logits = -np.cumsum(rng.exponential(1.0, size=(rows, k)), axis=1) * temperature
    top = logits[:, :1]
    lse = top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    tail = rng.uniform(0.001, 0.3, size=(rows, 1))
    logprobs = (logits - lse + np.log1p(-tail)).astype(np.float32)
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
