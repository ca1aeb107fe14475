"""`hyperdistill preflight` on the demo (tiny student + a real cache) and on the real student's architecture."""

from __future__ import annotations

import pytest

from common.errors import UserError
from stage2_student.preflight import run_preflight
from tests.pipeline_helpers import REPO


def _by_name(checks):
    return {c.name: c for c in checks}


def test_demo_preflight_passes(hf_cache_run):
    cfg, _ = hf_cache_run
    checks = _by_name(run_preflight(cfg, world_size=2))
    assert list(checks) == ["targets", "zero-init", "grad-flow", "cache", "memory", "kernels"]
    failed = {n: c.detail for n, c in checks.items() if not c.ok}
    assert not failed, failed
    assert "13 target linears" in checks["targets"].detail  # 3 DeltaNet layers x 3 + 1 attention x 4


def test_mismatched_cache_fails_the_cache_check(hf_cache_run):
    cfg, _ = hf_cache_run
    from dataclasses import replace

    other = replace(cfg, cache=replace(cfg.cache, path=str(REPO / "no-such-cache.zarr")))
    checks = _by_name(run_preflight(other, world_size=2))
    assert not checks["cache"].ok and "no-such-cache.zarr" in checks["cache"].detail
    assert checks["zero-init"].ok and checks["grad-flow"].ok


def test_real_student_architecture_checks_run_offline():
    """Qwen3-Coder-Next's published config (no weights): checks 1-3 on a one-period copy at real width."""
    from common.config import load_config

    # A small hypernetwork: the student's architecture is what is under test here.
    small = ["hyper.encoder_dim=64", "hyper.generator_dim=64", "hyper.encoder_layers=1", "hyper.encoder_heads=2"]
    cfg = load_config(REPO / "configs" / "qwen3_coder.yaml", small)
    checks = _by_name(run_preflight(cfg, world_size=8))
    assert "156 target linears" in checks["targets"].detail  # 36 DeltaNet x 3 + 12 attention x 4
    assert checks["zero-init"].ok and checks["grad-flow"].ok
    assert "4-layer copy" in checks["zero-init"].detail


def test_a_pattern_matching_nothing_is_an_error(hf_cache_run):
    cfg, _ = hf_cache_run
    from dataclasses import replace

    bad = replace(cfg, hyper=replace(cfg.hyper, targets=[r"self_attn\.nope$"]))
    with pytest.raises(UserError, match="nope"):
        run_preflight(bad, world_size=2)
