"""Stage 1 through the HF reference teacher into sampled rows (RS-KD): a real part, verified."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cache_schema import CacheReader, SamplingMeta, verify_cache


def test_stage1_hf_sampled_run_writes_a_verified_cache(tmp_path):
    """The smallest non-empty shard of the demo in 8 shards (1-3 samples cut to 512 tokens), scored by the HF
    teacher into sampled rows."""
    from common.manifest import prepare_data
    from common.models import load_tokenizer
    from stage1_teacher.run import main as stage1_main
    from tests.pipeline_helpers import demo_config

    cfg = demo_config(tmp_path, "teacher.backend=hf", "cache.rows=sampled", "cache.draws=16", "data.num_shards=8",
                      "data.max_tokens=512")
    prepare_data(cfg, load_tokenizer(cfg.student.model))
    shards = [json.loads(line)["shard"] for line in Path(cfg.manifest).read_text().splitlines() if line.strip()]
    shard = min(set(shards), key=shards.count)
    summary = stage1_main(cfg, shards=[shard])
    assert summary.shards_done == [shard] and summary.rows > 0
    report = verify_cache(cfg.cache.path, shards=[shard])
    assert report.ok, [str(p) for p in report.problems]
    reader = CacheReader(cfg.cache.path)
    assert reader.meta.sampled == SamplingMeta(draws=16, seed=0, support_k=None)
    s = reader[0]
    # HF resolves every draw: no tail, and the 16 draws of each row are all stored.
    assert (s.tail_mass == 0).all()
    np.testing.assert_allclose(np.exp(s.topk_logprobs.astype(np.float64)).sum(axis=1), 1.0, atol=1e-6)
