"""Distillation losses against the cached teacher top-K, with a chunked lm_head.

Student side (`student_topk_logprobs`): logits = hidden @ W^T / T over the whole vocabulary, but
only ever one row chunk at a time: per chunk, fp32 logits [chunk, V] -> logsumexp, gather at the
teacher's ids, argmax; the backward recomputes each chunk's logits. A [R, V] tensor never exists.
Measured on one H100 (R = 8192 rows, H = 2048, V = 151,936, K = 128, bf16 inputs, chunk 1024):
forward + backward 58 ms and 1.2 GiB beyond the inputs, vs 215 ms and 19.7 GiB for full fp32 logits.

Teacher side: cached log-probs [R, K] (rank order, log-softmax over the full vocabulary at T = 1);
the tail mass outside the top-K is 1 - sum(exp(logp)).

KL variants (per row; the caller averages over loss-mask rows):
- forward_tail (default): KL(P || Q) over K + 1 buckets, the K ids plus one tail bucket
  (teacher tail mass vs the student's mass outside those ids).
- forward_renorm: KL(P || Q) with both renormalised over the K ids (the seed's loss).
- reverse_tail: KL(Q || P) over the same K + 1 buckets.

Temperature T (Hinton et al. 2015): student logits / T; the teacher's K log-probs are re-tempered
as logp / T and renormalised; all losses are scaled by T^2 so gradient magnitudes do not depend on T.
The tail under temperature needs an assumption, since the cache does not say how the tail mass is
spread. We assume it is made of tokens that each have the K-th (smallest cached) probability p_K:
    tail_T ∝ sum_tail p^(1/T) ≈ (m / p_K) * p_K^(1/T) = m * p_K^(1/T - 1)
the most concentrated tail the cache allows. It is exact at T = 1 (and whenever the tail really is
flat at p_K); for T > 1 it is a lower bound on the tempered tail mass, for T < 1 an upper bound.

Sampled cache rows (cache.rows = "sampled"): a row holds the distinct ids of N draws from the teacher at
T = 1 with logp = log(count / N), and the draws the engine could not name (outside its top-K) as the tail.
forward_tail at T = 1 on such rows is the RS-KD loss (random-sampling KD): with every draw named (support
'full': the hf backend, vLLM's engine capture) its student-dependent part, -sum_k (count_k / N) log q_k, is an
unbiased estimate of the full cross-entropy -sum_v p_v log q_v, so its gradient is unbiased. With unnamed tail
draws (support 'top-K', vLLM's public path) the tail bucket also holds the top-K ids not drawn in that row: a small bias that shrinks
with N (cache_schema.format). Other losses or temperatures are biased on these rows; the trainer refuses
them. top1_agree on sampled rows compares with the most-drawn id (ties: the smallest id).

Full vocabulary (`full_vocab_kl`, kind "full_vocab"): with the teacher model itself at hand (small teachers only:
online distillation and the held-out yardstick, see train.py), the exact forward KL over all V ids, in row chunks.

Every kind is named in ALL_KINDS and computed through `distill_loss`; `training_kind` says which one a run trains
on and EVAL_KIND which one its held-out evaluation reports against the cache.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

LossKind = Literal["forward_tail", "forward_renorm", "reverse_tail"]
LOSS_KINDS: tuple[str, ...] = ("forward_tail", "forward_renorm", "reverse_tail")
"""Losses against the cache's top-K rows (train.loss takes one of these)."""
FULL_VOCAB = "full_vocab"
"""The exact forward KL over the whole vocabulary to a resident teacher (train.online_teacher / eval_teacher)."""
ALL_KINDS: tuple[str, ...] = (*LOSS_KINDS, FULL_VOCAB)
EVAL_KIND = "forward_tail"
"""The held-out yardstick against the cache, whatever the run trains on."""

TAIL_FLOOR = 1e-10
"""Tail masses are clamped at this floor before their log is taken (a zero tail gives no NaN)."""

TEACHER_LOGP_FLOOR = -1e4
"""Cached log-probs are clamped here: a decoded -inf would turn 0 * (log 0 - log q) into NaN."""


class StudentTopK(NamedTuple):
    logp: torch.Tensor
    """[R, K] fp32 student log-probs (at temperature T, normalised over the full vocabulary) at the ids."""
    logsumexp: torch.Tensor
    """[R] fp32 logsumexp over the vocabulary of logits / T."""
    argmax: torch.Tensor
    """[R] int64 full-vocabulary argmax of the student's logits (no gradient)."""


def _half_on_cuda(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16/fp16 operands on CUDA take cuBLAS's half-precision GEMM with fp32 accumulation and fp32
    output: the same logits as upcasting first (products of half-precision values are exact in
    fp32), at tensor-core speed and without an fp32 copy of the [V, H] weight."""
    return hidden.is_cuda and hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, half: bool) -> torch.Tensor:
    """h [c, H] @ w [V, H]^T -> fp32 [c, V]; `w` is already fp32 unless `half`."""
    if half:
        return torch.mm(h, w.T, out_dtype=torch.float32)
    return h.float() @ w.T


class _LmHeadGrads:
    """The gradients of (hidden [R, H], weight [V, H]) from per-chunk gradients of the fp32 logits, for the
    chunked losses' backward passes (only the inputs that need one get a buffer)."""

    def __init__(self, ctx, hidden: torch.Tensor, weight: torch.Tensor, w: torch.Tensor, half: bool):
        self.weight, self.w, self.half = weight, w, half
        self.g_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        need_w = ctx.needs_input_grad[1]
        self.g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None

    def add(self, s: int, h: torch.Tensor, d_logits: torch.Tensor) -> None:
        """Rows s : s + len(h) (their inputs h [c, H]) with logit gradient d_logits [c, V]."""
        if self.g_hidden is not None:
            # Half precision: the GEMM's inputs are rounded like the bf16/fp16 gradient it produces.
            self.g_hidden[s : s + len(h)] = (d_logits.to(self.w.dtype) if self.half else d_logits) @ self.w
        if self.g_weight is not None:
            self.g_weight += d_logits.T @ h.float()

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.g_hidden, None if self.g_weight is None else self.g_weight.to(self.weight.dtype)


class _ChunkedTopKLogProbs(torch.autograd.Function):
    """(hidden [R, H], weight [V, H], ids [R, K]) -> (logp [R, K], lse [R], argmax [R]), in row chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, chunk, temperature):
        half = _half_on_cuda(hidden, weight)
        w = weight if half else weight.float()  # one fp32 copy per call (none if already fp32)
        rows = hidden.shape[0]
        logp = hidden.new_empty(rows, ids.shape[1], dtype=torch.float32)
        lse = hidden.new_empty(rows, dtype=torch.float32)
        argmax = hidden.new_empty(rows, dtype=torch.long)
        for s in range(0, rows, chunk):
            logits = _chunk_logits(hidden[s : s + chunk], w, half).div_(temperature)  # [c, V]
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            logp[s : s + chunk] = logits.gather(1, ids[s : s + chunk]) - lse[s : s + chunk, None]
            argmax[s : s + chunk] = logits.argmax(dim=-1)
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.chunk, ctx.temperature = chunk, temperature
        ctx.mark_non_differentiable(argmax)
        return logp, lse, argmax

    @staticmethod
    def backward(ctx, g_logp, g_lse, _g_argmax):
        hidden, weight, ids, lse = ctx.saved_tensors
        chunk, temperature = ctx.chunk, ctx.temperature
        half = _half_on_cuda(hidden, weight)
        w = weight if half else weight.float()
        grads = _LmHeadGrads(ctx, hidden, weight, w, half)
        if g_logp is None:
            g_logp = torch.zeros(ids.shape, dtype=torch.float32, device=hidden.device)
        if g_lse is None:
            g_lse = torch.zeros(lse.shape, dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            # logp_k = logit_k - lse and d lse / d logits = softmax, so
            # d/d logits = scatter(g_logp) + softmax * (g_lse - sum_k g_logp); one [c, V] buffer, in place.
            gl = g_logp[s : s + chunk]
            coef = g_lse[s : s + chunk] - gl.sum(dim=-1)
            d_logits = _chunk_logits(h, w, half).div_(temperature).sub_(lse[s : s + chunk, None]).exp_()
            d_logits.mul_(coef[:, None]).scatter_add_(1, ids[s : s + chunk], gl).div_(temperature)
            grads.add(s, h, d_logits)
        return *grads.result(), None, None, None


def student_topk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor, chunk: int, temperature: float = 1.0
) -> StudentTopK:
    """hidden [R, H] (final-norm output), weight [V, H] (lm_head), topk_ids [R, K] -> StudentTopK.

    Logits in fp32 (see `_half_on_cuda`), in row chunks of `chunk`, recomputed per chunk in backward.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [R, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected topk_ids [R={hidden.shape[0]}, K], got {tuple(topk_ids.shape)}")
    if chunk < 1 or temperature <= 0:
        raise ValueError(f"chunk must be >= 1 and temperature > 0, got {chunk}, {temperature}")
    return StudentTopK(*_ChunkedTopKLogProbs.apply(hidden, weight, topk_ids.long(), chunk, float(temperature)))


def _log_tail(log_in_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_in_mass)), the mass outside a set, clamped at TAIL_FLOOR."""
    return torch.log(torch.clamp(-torch.expm1(torch.clamp(log_in_mass, max=0.0)), min=TAIL_FLOOR))


def teacher_buckets(teacher_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[R, K] cached log-probs -> [R, K + 1] normalised log-probs of the K ids and the tail at T.

    Uses the flat-tail assumption of the module docstring; at T = 1 it only renormalises (which
    also absorbs the cache's rounding when the K probabilities sum slightly above 1).
    """
    lp = teacher_logprobs.float().clamp(min=TEACHER_LOGP_FLOOR)
    log_tail = _log_tail(torch.logsumexp(lp, dim=-1))  # [R]
    # The K-th cached probability; padding entries of mass-adaptive rows (at the floor) are not entries.
    real = lp > TEACHER_LOGP_FLOOR
    log_pk = torch.where(real, lp, torch.zeros_like(lp)).min(dim=-1).values
    tail = log_tail + (1.0 / temperature - 1.0) * log_pk
    return torch.log_softmax(torch.cat([lp / temperature, tail[:, None]], dim=-1), dim=-1)


def kl_from_logprobs(
    student_logp: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: LossKind = "forward_tail",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row KL [R] from the student's tempered log-probs at the teacher ids [R, K] (from
    `student_topk_logprobs` with the same temperature) and the cached teacher log-probs [R, K]."""
    if kind == "forward_renorm":
        log_p = torch.log_softmax(teacher_logprobs.float().clamp(min=TEACHER_LOGP_FLOOR) / temperature, dim=-1)
        log_q = torch.log_softmax(student_logp, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    elif kind in ("forward_tail", "reverse_tail"):
        log_p = teacher_buckets(teacher_logprobs, temperature)
        log_q = torch.cat([student_logp, _log_tail(torch.logsumexp(student_logp, dim=-1))[:, None]], dim=-1)
        if kind == "forward_tail":
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        else:
            kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    else:
        raise ValueError(f"unknown loss kind {kind!r} for cached rows; expected one of {LOSS_KINDS}")
    return kl * temperature**2


class DistillOutput(NamedTuple):
    loss: torch.Tensor
    """[R] per-row KL, scaled by T^2."""
    top1_agree: torch.Tensor
    """[R] bool: the student's full-vocabulary argmax equals the teacher's rank-0 id."""
    student_tail: torch.Tensor
    """[R] student probability mass outside the teacher's K ids, at temperature T (no gradient)."""
    teacher_tail: torch.Tensor
    """[R] teacher tail mass 1 - sum(exp(logp)) at T = 1, clamped at 0 (no gradient)."""


def topk_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: LossKind = "forward_tail",
    temperature: float = 1.0,
    chunk: int = 1024,
) -> DistillOutput:
    """The whole loss for R loss rows: hidden [R, H], lm_head weight [V, H], cache rows [R, K]."""
    student = student_topk_logprobs(hidden, weight, topk_ids, chunk, temperature)
    loss = kl_from_logprobs(student.logp, teacher_logprobs, kind, temperature)
    with torch.no_grad():
        ids = topk_ids.long()
        top1 = student.argmax == ids[:, 0]
        s_tail = (1.0 - student.logp.exp().sum(dim=-1)).clamp(min=0.0)
        t_tail = (1.0 - teacher_logprobs.float().exp().sum(dim=-1)).clamp(min=0.0)
    return DistillOutput(loss, top1, s_tail, t_tail)


def _log_softmax_(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) over the last dim, in place on `logits` [c, V] (no second [c, V] buffer)."""
    logits.div_(temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


class _ChunkedFullVocabKL(torch.autograd.Function):
    """(hidden [R, H], weight [V, H], teacher_hidden [R, Ht], teacher_weight [V, Ht]) -> (kl [R],
    student argmax [R], teacher argmax [R]), in row chunks: per chunk both fp32 [c, V] logits, log-softmax,
    KL; backward recomputes both. Gradients flow to hidden and weight only (the teacher is frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, chunk, temperature):
        half = _half_on_cuda(hidden, weight)
        t_half = _half_on_cuda(teacher_hidden, teacher_weight)
        w = weight if half else weight.float()
        tw = teacher_weight if t_half else teacher_weight.float()
        rows = hidden.shape[0]
        kl = hidden.new_empty(rows, dtype=torch.float32)
        s_argmax = hidden.new_empty(rows, dtype=torch.long)
        t_argmax = hidden.new_empty(rows, dtype=torch.long)
        for s in range(0, rows, chunk):
            t_logits = _chunk_logits(teacher_hidden[s : s + chunk], tw, t_half)  # [c, V]
            s_logits = _chunk_logits(hidden[s : s + chunk], w, half)  # [c, V]
            t_argmax[s : s + chunk] = t_logits.argmax(dim=-1)
            s_argmax[s : s + chunk] = s_logits.argmax(dim=-1)
            log_p, log_q = _log_softmax_(t_logits, temperature), _log_softmax_(s_logits, temperature)
            # sum p (log p - log q), in place: the two [c, V] buffers are all the memory this needs.
            kl[s : s + chunk] = log_q.neg_().add_(log_p).mul_(log_p.exp_()).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight)
        ctx.chunk, ctx.temperature = chunk, temperature
        ctx.mark_non_differentiable(s_argmax, t_argmax)
        return kl * temperature**2, s_argmax, t_argmax

    @staticmethod
    def backward(ctx, g_kl, _g_s, _g_t):
        hidden, weight, teacher_hidden, teacher_weight = ctx.saved_tensors
        chunk, temperature = ctx.chunk, ctx.temperature
        half = _half_on_cuda(hidden, weight)
        t_half = _half_on_cuda(teacher_hidden, teacher_weight)
        w = weight if half else weight.float()
        tw = teacher_weight if t_half else teacher_weight.float()
        grads = _LmHeadGrads(ctx, hidden, weight, w, half)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            # d(T^2 KL)/d(student logits) = T^2 * (q - p) / T = T * (q - p), per row times the row's gradient.
            p = _log_softmax_(_chunk_logits(teacher_hidden[s : s + chunk], tw, t_half), temperature).exp_()
            d_logits = _log_softmax_(_chunk_logits(h, w, half), temperature).exp_().sub_(p)
            d_logits.mul_(g_kl[s : s + chunk, None] * temperature)
            grads.add(s, h, d_logits)
        return *grads.result(), None, None, None, None


def full_vocab_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chunk: int = 1024,
    temperature: float = 1.0,
) -> DistillOutput:
    """Forward KL(teacher || student) over the whole vocabulary, for R rows: the loss the cached losses
    approximate, computable only while the teacher itself is at hand (online distillation, or as the
    yardstick of a held-out evaluation).

    hidden [R, H] and weight [V, H]: the student's final-norm rows and lm_head; teacher_hidden [R, Ht] and
    teacher_weight [V, Ht]: the teacher's, at the same rows (same vocabulary, any width). Both sides' logits
    are fp32 and exist one row chunk at a time (two [chunk, V] buffers, worked in place, recomputed in
    backward), so memory is O(chunk x V) whatever R is. No gradient reaches the teacher's tensors. At
    temperature T both logits are divided by T and the KL is scaled by T^2, as in `kl_from_logprobs`.

    Returns a DistillOutput: loss [R], top1_agree = student argmax == the TEACHER's full-vocabulary argmax
    (not a cached rank-0 id); student_tail and teacher_tail are 0: nothing lies outside the full vocabulary.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [R, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if teacher_hidden.dim() != 2 or teacher_weight.dim() != 2 or teacher_hidden.shape[1] != teacher_weight.shape[1]:
        raise ValueError(
            f"expected teacher_hidden [R, Ht] and teacher_weight [V, Ht], got {tuple(teacher_hidden.shape)}, "
            f"{tuple(teacher_weight.shape)}"
        )
    if teacher_hidden.shape[0] != hidden.shape[0] or teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"teacher rows/vocabulary {teacher_hidden.shape[0]}/{teacher_weight.shape[0]} differ from the "
            f"student's {hidden.shape[0]}/{weight.shape[0]}"
        )
    if chunk < 1 or temperature <= 0:
        raise ValueError(f"chunk must be >= 1 and temperature > 0, got {chunk}, {temperature}")
    loss, s_argmax, t_argmax = _ChunkedFullVocabKL.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), chunk, float(temperature)
    )
    zeros = torch.zeros_like(loss).detach()
    return DistillOutput(loss, s_argmax == t_argmax, zeros, zeros)


# ---------------------------------------------------------------------------------------------
# The one place a loss kind is chosen and computed


class TeacherRows(NamedTuple):
    """A resident teacher's side of the full-vocabulary KL at a batch's rows."""

    hidden: torch.Tensor
    """[R, Ht] the teacher's final-norm hidden states at the batch's rows."""
    weight: torch.Tensor
    """[V, Ht] the teacher's lm_head."""


def training_kind(online_teacher: bool, loss: str) -> str:
    """The kind a run trains on: the full-vocabulary KL when distilling online, else train.loss."""
    return FULL_VOCAB if online_teacher else loss


def distill_loss(
    kind: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    teacher: TeacherRows | None = None,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> DistillOutput:
    """The loss of `kind` (ALL_KINDS) for R rows: hidden [R, H], lm_head weight [V, H], and the target that
    kind needs: the cache's rows (topk_ids, topk_logprobs [R, K]) for a top-K kind, the teacher's for FULL_VOCAB."""
    if kind == FULL_VOCAB:
        if teacher is None:
            raise ValueError("the full-vocabulary KL needs the teacher's rows")
        return full_vocab_kl(hidden, weight, teacher.hidden, teacher.weight, chunk, temperature)
    if kind in LOSS_KINDS:
        if topk_ids is None or topk_logprobs is None:
            raise ValueError(f"loss {kind} needs the cache's rows (topk_ids, topk_logprobs)")
        return topk_distill_loss(hidden, weight, topk_ids, topk_logprobs, kind, temperature, chunk)
    raise ValueError(f"unknown loss kind {kind!r}; expected one of {ALL_KINDS}")
