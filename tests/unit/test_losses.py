"""Chunked top-K distillation losses against naive full-vocabulary references on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from stage2_student.losses import (
    LOSS_KINDS,
    kl_from_logprobs,
    student_topk_logprobs,
    topk_distill_loss,
)

R, H, V, K = 37, 16, 1000, 8


def _teacher_rows(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full teacher logits [R, V] -> (ids [R, K], log-probs [R, K]) in rank order, as the cache holds."""
    logp = torch.log_softmax(teacher_logits.double(), dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    return ids, vals.float()


def _random_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, H, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H) * 3
    student_logits = hidden @ weight.T
    # Even rows: a teacher close to the student (same argmax); odd rows: an unrelated teacher.
    teacher_logits = 2.5 * torch.randn(R, V, generator=g)
    teacher_logits[0::2] = student_logits[0::2] * 1.5 + 0.01 * torch.randn(student_logits[0::2].shape, generator=g)
    ids, logp = _teacher_rows(teacher_logits, K)
    return hidden, weight, ids, logp


def _naive(hidden, weight, ids, teacher_logp, kind, temperature):
    """Float64, full vocabulary, probabilities instead of log-space tricks."""
    logits = (hidden.double() @ weight.double().T) / temperature
    q_full = torch.softmax(logits, dim=-1)  # [R, V]
    q_ids = q_full.gather(1, ids)
    in_set = torch.zeros_like(q_full, dtype=torch.bool).scatter_(1, ids, True)
    q_tail = (q_full * ~in_set).sum(dim=-1)  # exact sum over the non-ids

    p_ids = teacher_logp.double().exp()
    if kind == "forward_renorm":
        pt = p_ids ** (1 / temperature)
        p = pt / pt.sum(-1, keepdim=True)
        q = q_ids / q_ids.sum(-1, keepdim=True)
        kl = (p * (p.log() - q.log())).sum(-1)
    else:
        m = (1 - p_ids.sum(-1)).clamp(min=1e-10)
        pk = p_ids.min(-1).values
        tail_t = (m / pk) * pk ** (1 / temperature)  # tail as m/p_K tokens of probability p_K each
        unnorm = torch.cat([p_ids ** (1 / temperature), tail_t[:, None]], dim=-1)
        p = unnorm / unnorm.sum(-1, keepdim=True)
        q = torch.cat([q_ids, q_tail[:, None]], dim=-1)
        if kind == "forward_tail":
            kl = (p * (p.log() - q.log())).sum(-1)
        else:
            kl = (q * (q.log() - p.log())).sum(-1)
    return kl * temperature**2, logits.argmax(-1), q_tail


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("chunk", [5, 16])
def test_matches_naive_reference(kind, temperature, chunk):
    hidden, weight, ids, logp = _random_case()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = topk_distill_loss(h, w, ids, logp, kind=kind, temperature=temperature, chunk=chunk)

    h_ref = hidden.double().requires_grad_(True)
    w_ref = weight.double().requires_grad_(True)
    ref, ref_argmax, ref_tail = _naive(h_ref, w_ref, ids, logp, kind, temperature)

    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-4, atol=1e-6)
    # A non-uniform upstream gradient checks the per-row chain, not just the sum.
    upstream = torch.linspace(0.5, 1.5, R)
    (out.loss * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-4, atol=1e-6)

    expected_agree = ref_argmax == ids[:, 0]
    assert expected_agree.any() and not expected_agree.all()  # the case exercises both outcomes
    assert torch.equal(out.top1_agree, expected_agree)
    torch.testing.assert_close(out.student_tail.double(), ref_tail, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.teacher_tail.double(), 1 - logp.double().exp().sum(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_chunked_equals_unchunked(temperature):
    hidden, weight, ids, _ = _random_case(1)
    results = []
    for chunk in (3, 10, R, 1000):
        h = hidden.clone().requires_grad_(True)
        st = student_topk_logprobs(h, weight, ids, chunk=chunk, temperature=temperature)
        (st.logp.sin().sum() + st.logsumexp.cos().sum()).backward()  # gradients through both outputs
        results.append((st.logp, st.logsumexp, st.argmax, h.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-5)  # fp32 rounding of different matmul blockings


def test_logsumexp_and_logp_against_full_softmax():
    hidden, weight, ids, _ = _random_case(2)
    st = student_topk_logprobs(hidden, weight, ids.to(torch.uint32), chunk=6, temperature=0.5)
    full = torch.log_softmax(hidden.double() @ weight.double().T / 0.5, dim=-1)
    torch.testing.assert_close(st.logp.double(), full.gather(1, ids), rtol=1e-5, atol=1e-5)
    lse = torch.logsumexp(hidden.double() @ weight.double().T / 0.5, -1)
    torch.testing.assert_close(st.logsumexp.double(), lse, rtol=1e-6, atol=1e-5)
    assert st.logp.dtype == torch.float32


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_kl_nonnegative(kind, temperature):
    hidden, weight, ids, logp = _random_case(3)
    loss = topk_distill_loss(hidden, weight, ids, logp, kind=kind, temperature=temperature, chunk=8).loss
    assert loss.shape == (R,)
    assert torch.isfinite(loss).all()
    assert (loss > -1e-6).all()
    assert loss.max() > 1e-3  # the random student really differs from the teacher


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kl_zero_when_student_is_teacher(kind, temperature):
    """Student == teacher over the full vocabulary, and a tail flat at the K-th probability, so that
    the tempered tail assumption is exact: every variant must be 0 at every temperature."""
    v, k, rows = 50, 8, 6
    g = torch.Generator().manual_seed(4)
    p = torch.empty(rows, v, dtype=torch.float64)
    head = torch.rand(rows, k - 1, generator=g, dtype=torch.float64) + 1.0  # the 7 large probabilities
    p[:, : k - 1] = head
    p[:, k - 1 :] = 0.05  # 43 equal tail probabilities; one of them is the 8th cached id
    p /= p.sum(-1, keepdim=True)
    perm = torch.stack([torch.randperm(v, generator=g) for _ in range(rows)])  # scatter over the vocab
    p = torch.zeros_like(p).scatter_(1, perm, p)
    logp_full = p.log()
    ids = perm[:, :k]
    teacher_logp = logp_full.gather(1, ids).float()
    # W = identity, hidden = log p: the student's logits are exactly the teacher's log-probs.
    hidden = logp_full.float().requires_grad_(True)
    weight = torch.eye(v)
    out = topk_distill_loss(hidden, weight, ids, teacher_logp, kind=kind, temperature=temperature, chunk=4)
    torch.testing.assert_close(out.loss, torch.zeros(rows), rtol=0, atol=2e-6)
    out.loss.sum().backward()
    assert hidden.grad.abs().max() < 1e-4  # a minimum: the gradient vanishes too


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_zero_teacher_tail_and_neg_inf_logprob_are_finite(kind):
    hidden, weight, ids, _ = _random_case(5)
    g = torch.Generator().manual_seed(5)
    # A teacher whose whole mass sits on the K ids (tail exactly 0), one row with a -inf entry.
    logp = torch.log_softmax(torch.randn(R, K, generator=g), dim=-1).sort(dim=-1, descending=True).values
    logp[0, -1] = -math.inf
    h = hidden.clone().requires_grad_(True)
    out = topk_distill_loss(h, weight, ids, logp, kind=kind, temperature=1.3, chunk=7)
    assert torch.isfinite(out.loss).all()
    out.loss.sum().backward()
    assert torch.isfinite(h.grad).all()
    assert torch.allclose(out.teacher_tail[1:], torch.zeros(R - 1), atol=1e-6)  # row 0 lost its -inf entry


def test_unknown_kind_and_bad_shapes():
    hidden, weight, ids, logp = _random_case(6)
    with pytest.raises(ValueError, match="unknown loss kind"):
        kl_from_logprobs(logp, logp, kind="jsd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topk_ids"):
        student_topk_logprobs(hidden, weight, ids[:-1], chunk=4)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_padding_of_mass_adaptive_rows_does_not_change_the_buckets(temperature):
    """Mass-adaptive K rows are padded to K with floor log-probs: the K-th real entry sets the tail."""
    from stage2_student.losses import TEACHER_LOGP_FLOOR, teacher_buckets

    gen = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(5, 12, generator=gen) * 3, dim=-1).sort(dim=-1, descending=True).values[:, :6]
    padded = torch.cat([lp, torch.full((5, 4), -1e30)], dim=-1)
    a = teacher_buckets(lp, temperature)
    b = teacher_buckets(padded, temperature)
    torch.testing.assert_close(b[:, :6], a[:, :6])
    torch.testing.assert_close(b[:, -1], a[:, -1])
    assert torch.all(b[:, 6:10].exp() < 1e-30) and TEACHER_LOGP_FLOOR < 0
