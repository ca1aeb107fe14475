"""Shared fixtures. Expensive objects are session-scoped: the suite must stay under 10 minutes on 2 cores.

Layers: tests/unit (in-process: random tensors against naive references, tiny models, the cache format, the
config) and tests/integration (the real vLLM CPU engine, several gloo processes, whole pipeline stages). The
markers cross both: `-m "not engine and not distributed"` skips every engine and multi-process test
(unit/test_lora.py keeps its 2-process FSDP2 check, marked `distributed`, beside the helpers it shares)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen vocabulary with our chat template (about 2 s to build)."""
    from common.tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.fixture(scope="session")
def hf_cache_run(tmp_path_factory):
    """The demo pipeline up to a complete cache, scored by the reference (HF) backend: prepare-data then
    one uninterrupted stage-1 run over every shard. Returns (config, stage-1 summary)."""
    from common.manifest import prepare_data
    from common.models import load_tokenizer
    from stage1_teacher.run import main as stage1_main
    from tests.pipeline_helpers import demo_config

    cfg = demo_config(tmp_path_factory.mktemp("hf-cache"), "teacher.backend=hf")
    prepare_data(cfg, load_tokenizer(cfg.student.model))
    return cfg, stage1_main(cfg)


@pytest.fixture(scope="session")
def two_rank_run(hf_cache_run, tmp_path_factory):
    """One uninterrupted 2-rank FSDP2 training run (tests.pipeline_helpers.TRAIN) on the HF cache: the reference
    for the kill-and-resume test and the step-0 evaluation. Returns (output dir, finished process)."""
    from tests.pipeline_helpers import torchrun_train

    out = tmp_path_factory.mktemp("two-rank-run")
    return out, torchrun_train(hf_cache_run[0], out)


@pytest.fixture(scope="session")
def hf_sampled_shard(tmp_path_factory):
    """One sampled-rows part (RS-KD, 16 draws) scored by the reference (HF) teacher: the smallest non-empty
    shard of the demo in 8 shards (1-3 samples cut to 512 tokens). Returns (config, shard, stage-1 summary)."""
    import json
    from pathlib import Path

    from common.manifest import prepare_data
    from common.models import load_tokenizer
    from stage1_teacher.run import main as stage1_main
    from tests.pipeline_helpers import demo_config

    cfg = demo_config(tmp_path_factory.mktemp("hf-sampled"), "teacher.backend=hf", "cache.rows=sampled",
                      "cache.draws=16", "data.num_shards=8", "data.max_tokens=512")  # fmt: skip
    prepare_data(cfg, load_tokenizer(cfg.student.model))
    shards = [json.loads(line)["shard"] for line in Path(cfg.manifest).read_text().splitlines() if line.strip()]
    shard = min(set(shards), key=shards.count)
    return cfg, shard, stage1_main(cfg, shards=[shard])
