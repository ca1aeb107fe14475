"""Teacher backends: the real vLLM engine (CPU) and the transformers reference on a random tiny teacher.

The teacher is the tiny-teacher architecture (qwen3_moe, real 151,936-row vocabulary) at random init
with a large initializer_range, so that its next-token distributions are peaked and top-K comparisons
mean something. Both backends run it in float32 (vLLM's CPU backend accepts float32), so they differ
only by kernel rounding. The engine starts once for this module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import TeacherConfig
from stage1_teacher.backend import TopK, check_request, make_backend

K = 128
MAX_MODEL_LEN = 512
# Largest |Δ log-prob| allowed between two computations of the same float32 teacher: independent
# kernels (vLLM's CPU attention and fused MoE vs transformers) differ in rounding, amplified by the
# large random weights; measured up to ~3e-3 at 1000 tokens. Within transformers, differently shaped
# kernels (a shorter sequence, lm_head on selected rows) give up to ~2e-4. A wrong row (an off-by-one)
# would be off by whole nats.
ATOL_ENGINES = 1e-2
ATOL_SAME_FRAMEWORK = 1e-3

# vLLM's import touches a deprecated torch.distributed alias.
pytestmark = pytest.mark.filterwarnings("ignore:.*reduce_op.*:FutureWarning")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, qwen_tokenizer):
    """A random-init tiny teacher saved with the real tokenizer, float32."""
    from transformers import AutoModelForCausalLM

    from common.tiny_models import teacher_config

    cfg = teacher_config()
    cfg.initializer_range = 0.5  # logits of std ~6: peaked distributions, not near-uniform
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    qwen_tokenizer.save_pretrained(path)
    return str(path)


def _cfg(backend: str) -> TeacherConfig:
    return TeacherConfig(
        backend=backend,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_MODEL_LEN,  # below the requests' total: chunked prefill is exercised
        chunk_rows=64,  # several lm_head chunks per sequence
    )


@pytest.fixture(scope="module")
def hf_backend(teacher_dir):
    backend = make_backend(_cfg("hf"), teacher_dir, K)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def vllm_backend(teacher_dir):
    mp = pytest.MonkeyPatch()
    # Engine core and worker inside this process: no spawned processes, start-up in seconds rather than
    # about a minute (the spawned layout is the production one; it only moves the same code elsewhere).
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # 1 GiB of KV cache (plenty for 512-token prompts) instead of half the machine's memory; an
    # explicit size also skips vLLM's warm-up pass at start-up.
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = _cfg("vllm")
    cfg.capture = "public"  # vLLM's public prompt log-probs (the engine capture: test_capture.py)
    backend = make_backend(cfg, teacher_dir, K)
    yield backend
    backend.close()
    mp.undo()


@pytest.fixture(scope="module")
def requests():
    """Sequences of several lengths (chunked prefill mixes them) with dense, sparse and empty positions."""
    rng = np.random.default_rng(7)
    lengths = [300, 97, 2, 40, 200]
    seqs = [rng.integers(0, 151_643, n).astype(np.uint32) for n in lengths]
    positions = [
        np.arange(299),  # every position
        np.sort(rng.choice(96, 30, replace=False)),  # sparse
        np.array([0]),  # the shortest possible request
        np.array([], dtype=np.int64),  # nothing stored (no assistant token)
        np.arange(150, 199),  # a suffix, as with a final assistant turn
    ]
    return seqs, positions


@pytest.fixture(scope="module")
def hf_results(hf_backend, requests):
    return hf_backend.score(*requests)


@pytest.fixture(scope="module")
def vllm_results(vllm_backend, requests):
    return vllm_backend.score(*requests)


def assert_topk_close(a: TopK, b: TopK, atol: float) -> None:
    """Two top-K computations of the same distribution agree up to atol, except where ranks nearly tie.

    Rank-aligned values may differ by at most atol (sorting is 1-Lipschitz in the max norm); an id in
    one top-K but not the other must sit within atol of the other's K-th value (a near-tie at the
    boundary); an id in both must carry the same log-prob within atol.
    """
    assert a.ids.shape == b.ids.shape
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=atol)
    for r in range(len(a.ids)):
        la = dict(zip(a.ids[r].tolist(), a.logprobs[r].tolist()))
        lb = dict(zip(b.ids[r].tolist(), b.logprobs[r].tolist()))
        for x in la.keys() & lb.keys():
            assert abs(la[x] - lb[x]) <= atol, f"row {r}: id {x} differs by {abs(la[x] - lb[x])}"
        for x in la.keys() - lb.keys():
            assert la[x] <= b.logprobs[r, -1] + atol, f"row {r}: id {x} ({la[x]}) missing from the other top-K"
        for x in lb.keys() - la.keys():
            assert lb[x] <= a.logprobs[r, -1] + atol, f"row {r}: id {x} ({lb[x]}) missing from the other top-K"


def full_forward_topk(teacher_dir: str, seq: np.ndarray, positions: np.ndarray) -> TopK:
    """Independent oracle: the whole causal LM, full-vocabulary log_softmax, row t = logits at t."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(seq, dtype=torch.long)[None]).logits[0]  # [T, V]
    logprobs = torch.log_softmax(logits.double(), dim=-1)[torch.as_tensor(positions)]
    values, ids = torch.topk(logprobs, K, dim=-1)
    return TopK(ids.numpy().astype(np.uint32), values.float().numpy())


def check_invariants(results: list[TopK], positions: list[np.ndarray], vocab_size: int) -> None:
    for res, pos in zip(results, positions):
        ids, lps = res.ids, res.logprobs
        assert ids.dtype == np.uint32 and lps.dtype == np.float32
        assert ids.shape == lps.shape == (len(pos), K)
        if not len(pos):
            continue
        assert (ids < vocab_size).all()
        assert all(len(np.unique(row)) == K for row in ids), "ids in a row must be distinct"
        assert (np.diff(lps, axis=1) <= 0).all(), "rows must be in rank order, best first"
        assert (lps <= 0).all()
        mass = np.exp(lps.astype(np.float64)).sum(axis=1)
        assert (mass <= 1 + 1e-5).all()
        # Peaked teacher: the top-K carry real mass (a near-uniform one would give ~K/V = 0.0008).
        assert mass.min() > 0.05


# ---------------------------------------------------------------------------------------------
# Request validation and the engine's output layout (no engine)


def test_check_request_refuses_bad_positions_and_lengths():
    seq = np.arange(10, dtype=np.uint32)
    assert check_request([seq], [np.array([0, 3, 8], dtype=np.uint32)], 10, 100)[0].dtype == np.int64
    with pytest.raises(ValueError, match="max_model_len 9"):
        check_request([seq], [np.array([0])], 9, 100)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 9\)"):
        check_request([seq], [np.array([9])], 10, 100)  # the last token has no next token
    with pytest.raises(ValueError, match="strictly ascending"):
        check_request([seq], [np.array([3, 3])], 10, 100)
    with pytest.raises(ValueError, match="outside"):
        check_request([seq], [np.array([0])], 10, 5)
    with pytest.raises(ValueError, match="2 sequences but 1"):
        check_request([seq, seq], [np.array([0])], 10, 100)


def test_engine_arguments_follow_the_teacher_config():
    from stage1_teacher.vllm_backend import engine_kwargs

    cfg = TeacherConfig(dtype="bfloat16", quantization="fp8", tensor_parallel_size=4, max_model_len=8192)
    kwargs = engine_kwargs(cfg, "/models/teacher", 128)
    assert kwargs["model"] == "/models/teacher" and kwargs["quantization"] == "fp8"
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["max_logprobs"] == 128
    assert kwargs["max_model_len"] == 8193  # one slot for the token vLLM generates after the prompt
    assert "enable_expert_parallel" not in kwargs
    cfg.enable_expert_parallel = True
    assert engine_kwargs(cfg, "/models/teacher", 128)["enable_expert_parallel"] is True


def test_flat_logprobs_conversion_matches_vllms_own_layout():
    """Build FlatLogprobs with vLLM's own writer from known log-probs; the conversion must recover the top-K.

    The prompt token (written first, with its rank) is sometimes inside the top-K, so it appears twice;
    one row has tied values.
    """
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs

    from stage1_teacher.vllm_backend import flat_to_topk

    k, vocab, n = 4, 50, 6
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(n, vocab)))
    logits[2, :] = 0.0  # every id ties
    logprobs = torch.log_softmax(logits, dim=-1).float()  # row t: distribution over token t+1
    prompt = rng.integers(0, vocab, n + 1)
    prompt[2] = int(torch.argmax(logprobs[1]))  # the prompt token is the top-1 of row 1
    flat = create_prompt_logprobs(flat_logprobs=True)
    for t in range(n):  # as the engine does: [prompt token, top-1, ..., top-k] per position
        top_vals, top_ids = torch.topk(logprobs[t], k)
        token = int(prompt[t + 1])
        rank = int((logprobs[t] > logprobs[t, token]).sum()) + 1
        append_logprobs_for_next_position(
            flat,
            [token, *top_ids.tolist()],
            [float(logprobs[t, token]), *top_vals.tolist()],
            iter([None] * (k + 1)),
            rank,
            k,
        )
    positions = np.array([1, 2, 5])
    topk = flat_to_topk(flat, positions, k)
    ids, lps = topk.ids, topk.logprobs
    assert ids.shape == lps.shape == (3, k)
    for r, t in enumerate(positions):
        assert len(set(ids[r].tolist())) == k
        np.testing.assert_array_equal(lps[r], logprobs[t, ids[r]].numpy())  # values belong to their ids
        kth_best = torch.sort(logprobs[t], descending=True).values[k - 1]
        assert (lps[r] >= kth_best.item()).all()  # and they are the best k
        assert (np.diff(lps[r]) <= 0).all()


# ---------------------------------------------------------------------------------------------
# The transformers reference


def test_hf_rows_match_a_plain_full_forward(hf_results, requests, teacher_dir):
    seqs, positions = requests
    oracle = full_forward_topk(teacher_dir, seqs[1], positions[1])
    assert_topk_close(hf_results[1], oracle, ATOL_SAME_FRAMEWORK)


def test_hf_invariants_and_requested_rows_only(hf_backend, hf_results, requests):
    seqs, positions = requests
    check_invariants(hf_results, positions, hf_backend.vocab_size)
    assert hf_backend.engine_version.startswith("transformers==")
    # Rows of a subset of positions are the same rows as in the dense request, in the requested order.
    subset = np.array([5, 17, 250, 298])
    (sub,) = hf_backend.score([seqs[0]], [subset])
    assert_topk_close(sub, TopK(hf_results[0].ids[subset], hf_results[0].logprobs[subset]), ATOL_SAME_FRAMEWORK)


def test_hf_refuses_too_long_sequences(hf_backend):
    with pytest.raises(ValueError, match=f"max_model_len {MAX_MODEL_LEN}"):
        hf_backend.score([np.zeros(MAX_MODEL_LEN + 1, dtype=np.uint32)], [np.array([0])])


# ---------------------------------------------------------------------------------------------
# The vLLM engine


@pytest.mark.engine
def test_vllm_rows_match_a_plain_full_forward(vllm_results, requests, teacher_dir):
    """Row t of vLLM (its prompt_logprobs[t + 1]) is the distribution after tokens 0..t: no off-by-one."""
    seqs, positions = requests
    oracle = full_forward_topk(teacher_dir, seqs[4], positions[4])
    assert_topk_close(vllm_results[4], oracle, ATOL_ENGINES)


@pytest.mark.engine
def test_vllm_agrees_with_hf(vllm_results, hf_results):
    for v, h in zip(vllm_results, hf_results):
        assert_topk_close(v, h, ATOL_ENGINES)
    same_rank = np.concatenate([(v.ids == h.ids).ravel() for v, h in zip(vllm_results, hf_results)])
    assert same_rank.mean() > 0.95  # ties aside, the very same ids in the very same order


@pytest.mark.engine
def test_vllm_draws_agree_with_hf_draws(vllm_backend, hf_backend, requests):
    """Sampled rows: with the same uniforms both engines draw the same token wherever vLLM's draw falls in
    its top-K (up to the engines' rounding near CDF edges); HF resolves every draw, vLLM leaves the rest -1."""
    from stage1_teacher.sampling import TAIL_DRAW, sample_uniforms

    seqs, positions = requests
    uniforms = [sample_uniforms(0, f"seq-{i}", len(pos), 32) for i, pos in enumerate(positions)]
    v_rows, h_rows = vllm_backend.score(seqs, positions, uniforms), hf_backend.score(seqs, positions, uniforms)
    v = np.concatenate([r.draws for r in v_rows])
    h = np.concatenate([r.draws for r in h_rows])
    assert v.shape == h.shape == (sum(len(p) for p in positions), 32)
    assert (h >= 0).all() and (h < hf_backend.vocab_size).all()
    inside = v != TAIL_DRAW
    assert inside.mean() > 0.5 and (~inside).any()
    assert (v[inside] == h[inside]).mean() > 0.97
    # The -1 draws of vLLM are tokens outside its top-K for HF (again up to rounding at the edge).
    v_ids = np.concatenate([r.ids for r in v_rows])
    rows = np.nonzero(~inside)[0]
    outside = ~(v_ids[rows] == h[~inside][:, None]).any(axis=1)
    assert outside.mean() > 0.97


@pytest.mark.engine
def test_vllm_invariants_and_requested_rows_only(vllm_backend, vllm_results, requests):
    seqs, positions = requests
    check_invariants(vllm_results, positions, vllm_backend.vocab_size)
    assert vllm_backend.engine_version.startswith("vllm==")
    subset = np.array([5, 17, 250, 298])
    (sub,) = vllm_backend.score([seqs[0]], [subset])
    assert sub.ids.shape == (len(subset), K)
    assert_topk_close(sub, TopK(vllm_results[0].ids[subset], vllm_results[0].logprobs[subset]), ATOL_ENGINES)


@pytest.mark.engine
def test_vllm_refuses_too_long_sequences(vllm_backend):
    seq = np.zeros(MAX_MODEL_LEN + 1, dtype=np.uint32)
    with pytest.raises(ValueError, match=f"sequence 1 has {MAX_MODEL_LEN + 1} tokens"):
        vllm_backend.score([seq[:10], seq], [np.array([0]), np.array([0])])
    # The longest accepted sequence, scored at its last position.
    (res,) = vllm_backend.score([seq[:MAX_MODEL_LEN]], [np.array([MAX_MODEL_LEN - 2])])
    assert res.ids.shape == (1, K)
