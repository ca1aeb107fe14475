"""How far one optimizer step moves the LoRA weights the hypernetwork writes (the lr-stability mechanism).

Adam moves each weight by about lr per step whatever its gradient's scale, and every emitted A or B entry
sums G (generator_dim) head weights: with one learning rate for everything an entry moved ~0.8 * G * lr per
step, and the demo diverged above lr 2e-4. `HyperNetwork.optimizer_groups` scales the heads' lr by 1 / G so
that an entry moves at most ~lr, as a plain LoRA's does, whatever G, d_in or d_out.
"""

from __future__ import annotations

import pytest
import torch

from common.config import HyperConfig
from stage2_student.hypernet import HyperNetwork
from stage2_student.targets import Target

LR = 1e-3
# (d_in, d_out) of the tiny student's in_proj_qkvz and out_proj: a long and a wide side.
TARGETS = [Target("model.layers.0.linear_attn.in_proj_qkvz", 0, "in_proj_qkvz", 64, 1536),
           Target("model.layers.0.linear_attn.out_proj", 0, "out_proj", 512, 64)]  # fmt: skip


def _one_step(generator_dim: int, seed: int = 0) -> tuple[dict, dict]:
    """(LoRA before, LoRA after) one AdamW step at LR on a loss linear in every A and B entry."""
    torch.manual_seed(seed)
    cfg = HyperConfig(rank=8, alpha=16, encoder_dim=32, encoder_layers=1, encoder_heads=4, generator_dim=generator_dim)
    hyper = HyperNetwork(cfg, TARGETS, embed_dim=48)
    embeds, mask = torch.randn(2, 5, 48), torch.ones(2, 5, dtype=torch.bool)
    optimizer = torch.optim.AdamW(hyper.optimizer_groups(), lr=LR, weight_decay=0.0)
    for group in optimizer.param_groups:  # as the trainer sets the scheduled lr
        group["lr"] = LR * group["lr_scale"]
    before = hyper(embeds, mask)
    # Random directions for every entry: the gradient reaches the heads directly (not only through B A).
    g = torch.Generator().manual_seed(seed + 1)
    probes = {k: (torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)) for k, (a, b) in before.items()}
    loss = sum((a * pa).sum() + (b * pb).sum() for (a, b), (pa, pb) in zip(before.values(), probes.values()))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = hyper(embeds, mask)
    return {k: (a.detach(), b.detach()) for k, (a, b) in before.items()}, after


@pytest.mark.parametrize("generator_dim", [64, 1024])
def test_one_adam_step_moves_each_lora_entry_by_about_lr(generator_dim):
    before, after = _one_step(generator_dim)
    for name, (a0, b0) in before.items():
        a1, b1 = after[name]
        assert torch.count_nonzero(b0) == 0
        # Head weights move <= lr / G each over G unit-RMS inputs, the bias by <= lr.
        assert (b1 - b0).abs().max() <= 2.5 * LR, name
        # The encoder and generator (at lr) can turn A's normalised input, not grow it: A keeps its size
        # (with one lr for all, its head weights alone moved each entry by ~0.8 G lr, 0.05 to 0.8 here).
        assert 0.8 < a1.norm() / a0.norm() < 1.25, name
        # The step is not vanishing either: a plain LoRA's B entries move by ~lr.
        assert (b1 - b0).abs().mean() >= 0.1 * LR, name


def test_delta_step_does_not_grow_with_generator_width():
    """||B||_F after one step from B = 0, wide generator vs narrow: equal up to noise (it was ~16x)."""
    narrow = {k: b.norm() for k, (_, b) in _one_step(64)[1].items()}
    wide = {k: b.norm() for k, (_, b) in _one_step(1024)[1].items()}
    for name in narrow:
        assert 0.5 < wide[name] / narrow[name] < 2.0, (name, wide[name].item(), narrow[name].item())


def test_groups_cover_every_parameter_once():
    cfg = HyperConfig(encoder_dim=32, encoder_layers=1, generator_dim=64, train_encoder=True)
    hyper = HyperNetwork(cfg, TARGETS, embed_dim=48)
    groups = hyper.optimizer_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(hyper.parameters()))
    scaled = {id(p) for g in groups if g["lr_scale"] != 1.0 for p in g["params"]}
    heads = {id(h.proj.weight) for hs in (hyper.heads_a, hyper.heads_b) for h in hs.values()}
    assert scaled == heads and all(g["lr_scale"] == 1 / 64 for g in groups if g["lr_scale"] != 1.0)


def test_a_frozen_encoder_stays_as_initialised_while_the_rest_trains():
    """hyper.train_encoder false: the encoder is in no optimizer group, and two steps leave it (and so the task
    vector of a prompt) exactly as it was while the generator moves."""
    torch.manual_seed(0)
    cfg = HyperConfig(encoder_dim=32, encoder_layers=1, generator_dim=64, train_encoder=False)
    hyper = HyperNetwork(cfg, TARGETS, embed_dim=48)
    groups = hyper.optimizer_groups()
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in hyper.parameters() if p.requires_grad}
    assert not grouped & {id(p) for p in hyper.encoder.parameters()}
    embeds, mask = torch.randn(2, 5, 48), torch.ones(2, 5, dtype=torch.bool)
    encoder0 = {k: v.clone() for k, v in hyper.encoder.state_dict().items()}
    generator0 = [p.detach().clone() for p in hyper.generator.parameters()]
    z0 = hyper.encoder(embeds, mask)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    for _ in range(2):  # the second step: B != 0, so the gradient reaches the generator (and would the encoder)
        loss = sum(a.sum() + b.pow(2).sum() + b.sum() for a, b in hyper(embeds, mask).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in hyper.encoder.parameters())
    assert all(torch.equal(v, encoder0[k]) for k, v in hyper.encoder.state_dict().items())
    assert torch.equal(hyper.encoder(embeds, mask), z0)
    assert any(not torch.equal(p, p0) for p, p0 in zip(hyper.generator.parameters(), generator0))
