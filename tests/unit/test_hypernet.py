"""Target resolution, the hypernetwork's outputs at init, and its size for the tiny and real students."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.config import HyperConfig, RunConfig
from common.errors import UserError
from common.tiny_models import student_config
from stage2_student.hypernet import HyperNetwork
from stage2_student.param_count import count_hypernet_params
from stage2_student.targets import resolve_targets

ATTN_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj"}
DELTANET_KINDS = {"in_proj_qkvz", "in_proj_ba", "out_proj"}


@pytest.fixture(scope="module")
def student():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(student_config()).eval().requires_grad_(False)


def test_default_targets_on_tiny_student(student):
    cfg = student_config()
    targets = resolve_targets(student, HyperConfig().targets)
    n_full = cfg.layer_types.count("full_attention")
    n_linear = cfg.layer_types.count("linear_attention")
    by_kind = {k: [t for t in targets if t.kind == k] for k in ATTN_KINDS | DELTANET_KINDS}
    assert {t.kind for t in targets} == ATTN_KINDS | DELTANET_KINDS
    for kind in ATTN_KINDS:
        assert len(by_kind[kind]) == n_full
        assert all(cfg.layer_types[t.layer] == "full_attention" for t in by_kind[kind])
    for kind in DELTANET_KINDS:
        assert len(by_kind[kind]) == n_linear
        assert all(cfg.layer_types[t.layer] == "linear_attention" for t in by_kind[kind])
    modules = dict(student.named_modules())
    for t in targets:
        assert isinstance(modules[t.name], nn.Linear)
        assert (t.in_features, t.out_features) == (modules[t.name].in_features, modules[t.name].out_features)
        assert f"layers.{t.layer}." in t.name and t.name.endswith("." + t.kind)
    assert [(t.layer, t.name) for t in targets] == sorted((t.layer, t.name) for t in targets)
    assert targets == resolve_targets(student, list(reversed(HyperConfig().targets)))  # order-independent


def test_pattern_matching_nothing_is_a_user_error(student):
    with pytest.raises(UserError, match=r"linear_q\|linear_k.*matches no nn.Linear.*in_proj_qkvz"):
        resolve_targets(student, [r"self_attn\.q_proj$", r"linear_attn\.(linear_q|linear_k)$"])
    with pytest.raises(UserError, match="not a valid regex"):
        resolve_targets(student, [r"self_attn\.(q_proj"])
    with pytest.raises(UserError, match="not inside a numbered decoder layer"):
        resolve_targets(student, [r"^lm_head$"])


def _prompts(student, n=3, p=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150000, (n, p), generator=g)
    mask = torch.ones(n, p, dtype=torch.bool)
    mask[1, 6:] = False
    return ids, mask, student.get_input_embeddings()(ids).detach()


def test_outputs_at_init(student):
    cfg = HyperConfig()
    targets = resolve_targets(student, cfg.targets)
    torch.manual_seed(1)
    hyper = HyperNetwork(cfg, targets, embed_dim=student.config.hidden_size)
    _, mask, emb = _prompts(student)
    out = hyper(emb, mask)
    assert set(out) == {t.name for t in targets}
    for t in targets:
        a, b = out[t.name]
        assert a.shape == (3, cfg.rank, t.in_features) and a.dtype == torch.float32
        assert b.shape == (3, t.out_features, cfg.rank) and b.dtype == torch.float32
        assert torch.count_nonzero(b) == 0  # zero-initialised B heads: step 0 is the base student
        # PEFT's default A is kaiming_uniform(a=sqrt(5)): variance 1 / (3 d_in).
        assert 0.5 < a.std().item() * math.sqrt(3 * t.in_features) < 2.0
    a0 = out[targets[0].name][0]
    assert not torch.allclose(a0[0], a0[2])  # different prompts, different A
    assert not torch.allclose(out[targets[0].name][0][0], out[targets[1].name][0][0])  # targets differ


def test_padding_is_ignored(student):
    """A prompt's LoRA does not depend on padding after it nor on the other prompts of the batch."""
    cfg = HyperConfig()
    targets = resolve_targets(student, cfg.targets)
    torch.manual_seed(2)
    hyper = HyperNetwork(cfg, targets, embed_dim=student.config.hidden_size)
    _, mask, emb = _prompts(student)
    batched = hyper(emb, mask)
    alone = hyper(emb[1:2, :6], mask[1:2, :6])
    for name, (a, _) in alone.items():
        torch.testing.assert_close(batched[name][0][1:2], a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one prompt token"):
        hyper(emb, torch.zeros_like(mask))


def test_calibration_standardises_the_task_vector(student):
    """Prompts that share most of their text (as a run's do) give a task vector that is mostly the same for all of
    them; after `calibrate` it has mean 0 and std 1 per feature over those prompts, A keeps its init scale, B stays
    0, and the statistics travel in the state dict."""
    cfg = HyperConfig()
    targets = resolve_targets(student, cfg.targets)
    torch.manual_seed(3)
    hyper = HyperNetwork(cfg, targets, embed_dim=student.config.hidden_size)
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 150000, (1, 24), generator=g).expand(32, -1)
    ids = torch.cat([shared, torch.randint(0, 150000, (32, 4), generator=g)], dim=1)  # 24 shared tokens + 4 own
    emb, mask = student.get_input_embeddings()(ids).detach(), torch.ones(ids.shape, dtype=torch.bool)
    before = hyper.encoder(emb, mask)
    report = hyper.calibrate([(emb[:16], mask[:16]), (emb[16:], mask[16:])])
    assert report["prompts"] == 32 and report["varying_share"] < 0.5
    torch.testing.assert_close(before, hyper.encoder.pooled(emb, mask))  # the raw vector is untouched
    z = hyper.encoder(emb, mask)
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(z.shape[1]), atol=1e-4, rtol=0)
    out = hyper(emb, mask)
    for t in targets:
        a, b = out[t.name]
        assert torch.count_nonzero(b) == 0
        assert 0.5 < a.std().item() * math.sqrt(3 * t.in_features) < 2.0
    state = hyper.state_dict()
    assert {"encoder.z_mean", "encoder.z_std"} <= set(state)
    torch.manual_seed(4)
    other = HyperNetwork(cfg, targets, embed_dim=student.config.hidden_size)
    other.load_state_dict(state)
    torch.testing.assert_close(other.encoder(emb, mask), z)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        hyper.calibrate([(emb[:1], mask[:1])])


def test_param_counts_tiny_and_real(student):
    from transformers import Qwen3NextConfig

    cfg = HyperConfig()
    real_cfg = Qwen3NextConfig()
    real = count_hypernet_params(RunConfig(hyper=cfg), real_cfg)
    n_full = real_cfg.layer_types.count("full_attention")
    n_linear = real_cfg.layer_types.count("linear_attention")
    assert (n_full, n_linear) == (12, 36)
    assert real["targets_by_kind"] == {**{k: n_full for k in ATTN_KINDS}, **{k: n_linear for k in DELTANET_KINDS}}
    # Shapes from Qwen/Qwen3-Coder-Next's published config.json (out, in): q (8192, 2048), k/v (512, 2048),
    # o/out_proj (2048, 4096), in_proj_qkvz (12288, 2048), in_proj_ba (64, 2048).
    shapes = {(2048, 8192), (2048, 512), (4096, 2048), (2048, 12288), (2048, 64)}
    assert set(real["shapes"]) == {f"in{i}_out{o}" for i, o in shapes}
    dense_heads = cfg.generator_dim * cfg.rank * sum(i + o for i, o in shapes)
    heads = real["params"]["heads_a"] + real["params"]["heads_b"]
    assert heads < dense_heads / 10  # chunked heads are an order of magnitude below dense ones
    parts = {k: v for k, v in real["params"].items() if k not in ("total", "trainable")}
    assert real["params"]["total"] == sum(parts.values())
    assert real["params"]["trainable"] == real["params"]["total"] - parts["encoder"]  # frozen by default
    assert real["params"]["total"] < 20_000_000
    assert real["lora_params_per_sample"] == cfg.rank * (
        n_linear * (2048 + 12288 + 2048 + 64 + 4096 + 2048) + n_full * (2048 + 8192 + 2 * (2048 + 512) + 4096 + 2048)
    )

    tiny = count_hypernet_params(RunConfig(hyper=cfg), student_config())
    built = HyperNetwork(cfg, resolve_targets(student, cfg.targets), embed_dim=student.config.hidden_size)
    assert tiny["params"]["total"] == sum(p.numel() for p in built.parameters())
    assert tiny["num_targets"] == 13
