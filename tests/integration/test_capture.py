"""vLLM engine capture (teacher.capture: engine) against the public prompt-log-prob path and the HF reference,
on the real CPU engine: top-K, log-probs, exact sampled rows (chi-square against the full softmax), and a
SIGKILLed capture job that resumes.

The teacher is test_backends' random-init float32 tiny teacher (peaked rows, a large tail). The public
engine scores the shared requests once and is closed before the capture engine starts (two in-process
engines do not share one process); the capture engine then serves every test of the module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import UserError
from stage1_teacher.backend import make_backend
from stage1_teacher.sampling import TAIL_DRAW, sample_uniforms
from tests.stats import chi_square
from tests.integration.test_backends import (  # noqa: F401 (fixtures)
    ATOL_ENGINES,
    K,
    _cfg,
    assert_topk_close,
    check_invariants,
    hf_backend,
    requests,
    teacher_dir,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*reduce_op.*:FutureWarning")
N_DRAWS = 32


def uniforms_for(positions, draws=N_DRAWS, prefix="seq"):
    return [sample_uniforms(0, f"{prefix}-{i}", len(pos), draws) for i, pos in enumerate(positions)]


@pytest.fixture(scope="module")
def in_process_engine():
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: seconds to start, not a minute
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def public_results(in_process_engine, teacher_dir, requests):
    """The public path's rows and draws of the shared requests; its engine is closed afterwards."""
    cfg = _cfg("vllm")
    cfg.capture = "public"
    backend = make_backend(cfg, teacher_dir, K)
    try:
        return backend.score(*requests, uniforms_for(requests[1]))
    finally:
        backend.close()


@pytest.fixture(scope="module")
def capture_backend(in_process_engine, teacher_dir, public_results):
    cfg = _cfg("vllm")
    assert cfg.capture == "engine"  # the default with the vllm backend
    backend = make_backend(cfg, teacher_dir, K)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def capture_results(capture_backend, requests):
    return capture_backend.score(*requests, uniforms_for(requests[1]))


def test_an_unsupported_vllm_is_one_line_naming_the_public_path():
    from stage1_teacher.capture_backend import check_vllm_version

    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1+cpu")
    for other in ("0.33.0", "0.3.2", "1.0.0"):
        with pytest.raises(UserError, match=r"installed: .*teacher\.capture: public") as e:
            check_vllm_version(other)
        assert "\n" not in str(e.value)


@pytest.mark.engine
def test_capture_rows_are_the_public_paths(capture_results, public_results, requests, capture_backend):
    """The same engine, the same prompts: the same top-K ids in the same order, log-probs within the tolerance
    of two engines (they differ only in which rows lm_head sees at once, and in logits - lse against vLLM's
    log_softmax)."""
    check_invariants(capture_results, requests[1], capture_backend.vocab_size)
    assert capture_backend.engine_version.startswith("vllm==") and "capture=engine" in capture_backend.engine_version
    for c, p in zip(capture_results, public_results):
        np.testing.assert_array_equal(c.ids, p.ids)
        assert_topk_close(c, p, ATOL_ENGINES)
    diff = max(float(np.abs(c.logprobs - p.logprobs).max(initial=0.0)) for c, p in zip(capture_results, public_results))
    assert diff < 1e-4  # float32 teacher, same kernels: far inside ATOL_ENGINES


@pytest.mark.engine
def test_capture_agrees_with_hf(capture_results, hf_backend, requests):
    hf_results = hf_backend.score(*requests)
    for c, h in zip(capture_results, hf_results):
        assert_topk_close(c, h, ATOL_ENGINES)
    same_rank = np.concatenate([(c.ids == h.ids).ravel() for c, h in zip(capture_results, hf_results)])
    assert same_rank.mean() > 0.95


@pytest.mark.engine
def test_capture_draws_are_exact_and_equal_the_hf_draws(capture_results, public_results, hf_backend, requests):
    """Every capture draw is a token (support 'full'); with the same uniforms it is the HF reference's draw and,
    wherever the public path's draw fell inside its top-K, the public path's draw (up to rounding at CDF edges)."""
    h_rows = hf_backend.score(*requests, uniforms_for(requests[1]))
    c = np.concatenate([r.draws for r in capture_results])
    h = np.concatenate([r.draws for r in h_rows])
    p = np.concatenate([r.draws for r in public_results])
    assert c.shape == h.shape == (sum(len(x) for x in requests[1]), N_DRAWS)
    assert (c >= 0).all() and (c < hf_backend.vocab_size).all()
    assert (p == TAIL_DRAW).any()  # the tail matters: the public path leaves some draws unnamed
    assert (c == h).mean() > 0.97
    tail = p == TAIL_DRAW
    # Draws inside the top-K, where the engines name the same ids: the same token.
    assert (c[~tail] == h[~tail]).mean() > 0.99 and (c[~tail] == p[~tail]).mean() > 0.99
    # Beyond the top-K the CDF runs over ~150k ids in id order, each interval ~1e-5 of the mass wide, so the two
    # engines' rounding (~1e-3 in log-prob) moves an edge past a uniform far more often; still mostly the same
    # token (the tail's distribution is checked by the chi-square test below).
    assert (c[tail] == h[tail]).mean() > 0.9


@pytest.mark.engine
def test_capture_sampled_rows_pass_chi_square_against_the_full_softmax(capture_backend, hf_backend, teacher_dir):
    """One short sequence sent as 200 requests (each its own sample id, so its own uniforms): at each position
    the 200 x 64 draws are samples of one distribution; the full softmax of that row, from a plain float64
    transformers forward, predicts their frequencies. The HF reference passes the same test."""
    from transformers import AutoModelForCausalLM

    seq = np.random.default_rng(11).integers(0, 151_643, 6).astype(np.uint32)
    pos = np.arange(5)
    copies, n = 200, 64
    seqs, positions = [seq] * copies, [pos] * copies
    uniforms = [sample_uniforms(1, f"copy-{i}", len(pos), n) for i in range(copies)]
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(seq, dtype=torch.long)[None]).logits[0, pos].double()
    p = torch.softmax(logits, dim=-1).numpy()  # [5, V]
    figures = {}
    for name, backend in (("capture", capture_backend), ("hf", hf_backend)):
        rows = backend.score(seqs, positions, uniforms)
        draws = np.stack([r.draws for r in rows])  # [copies, 5, n]
        assert (draws >= 0).all()
        for t in range(len(pos)):
            chi2, dof = chi_square(draws[:, t], p[t])
            figures[name, t] = (round(chi2, 1), dof)
            # The 99.9% quantile of chi-square is below dof + 4.5 sqrt(2 dof) + 10 (Wilson-Hilferty).
            assert chi2 < dof + 4.5 * np.sqrt(2 * dof) + 10, (name, t, chi2, dof)
        tail_share = np.mean([(~np.isin(draws[:, t], np.argsort(-p[t])[:K])).mean() for t in range(len(pos))])
        figures[name, "tail share"] = round(float(tail_share), 4)
        assert tail_share > 0.02  # thousands of the 64,000 draws lie beyond the top-K: the tail is tested
    print("chi-square (chi2, dof) per position:", figures)


@pytest.mark.engine
def test_capture_refuses_too_long_sequences(capture_backend):
    from tests.integration.test_backends import MAX_MODEL_LEN

    seq = np.zeros(MAX_MODEL_LEN + 1, dtype=np.uint32)
    with pytest.raises(ValueError, match=f"sequence 1 has {MAX_MODEL_LEN + 1} tokens"):
        capture_backend.score([seq[:10], seq], [np.array([0]), np.array([0])])
    (res,) = capture_backend.score([seq[:MAX_MODEL_LEN]], [np.array([MAX_MODEL_LEN - 2])])
    assert res.ids.shape == (1, K)


def test_batch_invariant_mode_is_refused_on_cpu_in_one_line(teacher_dir):
    """vLLM 0.32's VLLM_BATCH_INVARIANT kernels are GPU ones; its CPU MoE backend refuses the mode at start-up.
    The option says so before an engine starts, for both paths."""
    for capture in ("engine", "public"):
        cfg = _cfg("vllm")
        cfg.capture, cfg.batch_invariant = capture, True
        with pytest.raises(UserError, match="teacher.batch_invariant: .*no CPU kernels") as e:
            make_backend(cfg, teacher_dir, K)
        assert "\n" not in str(e.value)
