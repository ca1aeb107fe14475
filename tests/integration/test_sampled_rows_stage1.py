"""Stage 1 through the HF reference teacher into sampled rows (RS-KD): a real part, verified."""

from __future__ import annotations

import numpy as np

from cache_schema import CacheReader, SamplingMeta, verify_cache


def test_stage1_hf_sampled_run_writes_a_verified_cache(hf_sampled_shard):
    """The smallest non-empty shard of the demo in 8 shards (1-3 samples cut to 512 tokens), scored by the HF
    teacher into sampled rows."""
    cfg, shard, summary = hf_sampled_shard
    assert summary.shards_done == [shard] and summary.rows > 0
    report = verify_cache(cfg.cache.path, shards=[shard])
    assert report.ok, [str(p) for p in report.problems]
    reader = CacheReader(cfg.cache.path)
    assert reader.meta.sampled == SamplingMeta(draws=16, seed=0, support_k=None)
    s = reader[0]
    # HF resolves every draw: no tail, and the 16 draws of each row are all stored.
    assert (s.tail_mass == 0).all()
    np.testing.assert_allclose(np.exp(s.topk_logprobs.astype(np.float64)).sum(axis=1), 1.0, atol=1e-6)
