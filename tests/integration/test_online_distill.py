"""Online full-vocabulary distillation: the chunked full-vocabulary KL against a naive one, a tiny training run
with the teacher resident in stage 2, and the refusals (sampled rows with a biased loss, another vocabulary,
online distillation with a loss it does not train)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from cache_schema.metadata import SamplingMeta
from common.config import load_config
from common.errors import UserError
from stage2_student.distributed import DistEnv
from stage2_student.losses import full_vocab_kl
from stage2_student.checks import check_sampled_rows
from stage2_student.train import ResidentTeacher, train
from tests.pipeline_helpers import REPO, config_overrides


def naive_full_kl(hidden, weight, t_hidden, t_weight, temperature):
    """KL(p || q) * T^2 from whole [R, V] logits, the obvious way."""
    log_p = torch.log_softmax(t_hidden.float() @ t_weight.float().T / temperature, dim=-1)
    log_q = torch.log_softmax(hidden.float() @ weight.float().T / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_full_vocab_kl_matches_naive_values_and_gradients(temperature, chunk):
    g = torch.Generator().manual_seed(int(temperature * 10) + chunk)
    rows, h, ht, vocab = 9, 8, 12, 97
    hidden = torch.randn(rows, h, generator=g).requires_grad_()
    weight = torch.randn(vocab, h, generator=g).requires_grad_()
    t_hidden, t_weight = torch.randn(rows, ht, generator=g), torch.randn(vocab, ht, generator=g)
    row_grad = torch.rand(rows, generator=g)  # an uneven weighting, so every row's gradient path counts

    out = full_vocab_kl(hidden, weight, t_hidden, t_weight, chunk=chunk, temperature=temperature)
    got = torch.autograd.grad((out.loss * row_grad).sum(), [hidden, weight])
    ref = naive_full_kl(hidden, weight, t_hidden, t_weight, temperature)
    want = torch.autograd.grad((ref * row_grad).sum(), [hidden, weight])

    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (out.loss > 0).all()
    s_argmax = (hidden @ weight.T).argmax(-1)
    t_argmax = (t_hidden @ t_weight.T).argmax(-1)
    assert torch.equal(out.top1_agree, s_argmax == t_argmax)
    assert not out.student_tail.any() and not out.teacher_tail.any()


def test_full_vocab_kl_is_zero_for_the_teacher_itself():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(5, 6, generator=g).requires_grad_(), torch.randn(40, 6, generator=g)
    out = full_vocab_kl(hidden, weight, hidden.detach(), weight, chunk=2)
    assert out.loss.abs().max() < 1e-5
    assert out.top1_agree.all()
    (grad,) = torch.autograd.grad(out.loss.sum(), [hidden])
    assert grad.abs().max() < 1e-5  # the minimum: q = p


def test_full_vocab_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="vocabulary"):
        full_vocab_kl(torch.randn(3, 4), torch.randn(10, 4), torch.randn(3, 5), torch.randn(11, 5))
    with pytest.raises(ValueError, match="chunk"):
        full_vocab_kl(torch.randn(3, 4), torch.randn(10, 4), torch.randn(3, 5), torch.randn(10, 5), chunk=0)


# ---- the trainer ----------------------------------------------------------------------------------------------


def _sampled_reader():
    return SimpleNamespace(meta=SimpleNamespace(sampled=SamplingMeta(draws=16, seed=0)), path="runs/x/cache.zarr")


@pytest.mark.parametrize("overrides", [["train.loss=forward_renorm"], ["train.loss=reverse_tail"],
                                       ["train.temperature=2.0"]])  # fmt: skip
def test_sampled_cache_refused_with_a_biased_loss(overrides):
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    with pytest.raises(UserError, match=r"runs/x/cache\.zarr: sampled rows \(16 draws") as e:
        check_sampled_rows(_sampled_reader(), cfg)
    assert "\n" not in str(e.value)


def test_sampled_cache_accepted_for_rs_kd_and_online():
    check_sampled_rows(_sampled_reader(), load_config(REPO / "configs" / "demo.yaml"))  # forward_tail, T = 1
    # Online, the rows' contents are not trained on: any temperature is fine.
    online = load_config(REPO / "configs" / "demo.yaml", ["train.online_teacher=true", "train.temperature=2.0"])
    check_sampled_rows(_sampled_reader(), online)


def test_online_teacher_needs_the_forward_loss():
    with pytest.raises(UserError, match="train.online_teacher.*forward_tail"):
        load_config(REPO / "configs" / "demo.yaml", ["train.online_teacher=true", "train.loss=reverse_tail"])


def test_resident_teacher_with_another_vocabulary_is_refused():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    with pytest.raises(UserError, match="vocabulary of 151936 ids differs from the student's 1000"):
        ResidentTeacher(cfg, student_vocab=1000, device=torch.device("cpu"))


def test_online_training_reports_full_vocab_kl(hf_cache_run, tmp_path):
    """Two steps in this process (one rank, no FSDP), distilled online from the resident tiny teacher."""
    cache_cfg, _ = hf_cache_run
    check_sampled_rows(SimpleNamespace(meta=SimpleNamespace(sampled=None)), cache_cfg)  # top-K: never refused
    out = tmp_path / "student"
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"manifest={cache_cfg.manifest}", f"cache.path={cache_cfg.cache.path}", f"train.output_dir={out}",
        "train.phases=[{name: main, epochs: 1, seq_len: 768}]", "train.max_steps=2", "train.batch_size=1",
        "train.warmup_steps=1", "train.lr=1e-3", "train.loss_chunk=128", "train.checkpoint_every=100",
        "train.online_teacher=true", "train.eval_teacher=true",
        "hyper.encoder_dim=64", "hyper.generator_dim=128", "hyper.encoder_layers=1",
    ])  # fmt: skip
    result = train(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    assert result["steps"] == 2
    before, after = result["kl_full_before"], result["kl_full_after"]
    assert math.isfinite(before) and math.isfinite(after) and before > 0
    assert after != before  # the hypernetwork's LoRA moved the student (B starts at zero)
    assert 0.0 <= result["top1_full_after"] <= 1.0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["split"] == "eval"]
    assert [m["step"] for m in evals] == [0, 2] and evals[0]["rows"] > 10
    assert all({"kl", "kl_full", "top1_full"} <= m.keys() for m in evals)
    # Online, the training loss is the full-vocabulary KL: no tail bucket exists.
    assert [m["tail"] for m in metrics if m["split"] == "train"] == [0.0, 0.0]


def test_training_on_a_real_sampled_cache_with_a_biased_loss_is_refused(hf_sampled_shard, tmp_path):
    """A sampled cache written by stage 1 (one small shard, HF backend) carries RootMeta.sampled; the trainer
    refuses reverse KL on it before loading any model."""
    from cache_schema import CacheReader

    sampled_cfg, _, _ = hf_sampled_shard
    assert CacheReader(sampled_cfg.cache.path).meta.sampled.draws == 16
    biased = load_config(REPO / "configs" / "demo.yaml", [
        *config_overrides(sampled_cfg), f"train.output_dir={tmp_path / 'student'}", "teacher.backend=hf",
        "cache.rows=sampled", "cache.draws=16", "data.num_shards=8", "train.loss=reverse_tail"])  # fmt: skip
    with pytest.raises(UserError, match="sampled rows .*train.loss=forward_tail"):
        train(biased, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
