"""Per-sample LoRA injection on the tiny Qwen3-Next student: exactness at init, a merged-weights
reference, activation checkpointing, gradient flow, hook removal, and FSDP2 (2 gloo processes)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from common.config import HyperConfig
from common.tiny_models import student_config
from stage2_student.hypernet import HyperNetwork
from stage2_student.lora import LoRAInjector
from stage2_student.targets import resolve_targets

N, T, P = 2, 12, 7


def _build_student(seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(student_config()).eval().requires_grad_(False)


def _build_hyper(student, seed: int = 1, train_encoder: bool = True):
    """The whole hypernetwork trainable by default: the gradient tests then cover the path into the encoder too."""
    cfg = HyperConfig(train_encoder=train_encoder)
    torch.manual_seed(seed)
    return HyperNetwork(cfg, resolve_targets(student, cfg.targets), embed_dim=student.config.hidden_size)


def _randomize_b(hyper: HyperNetwork, seed: int = 2) -> None:
    """Give every B head non-zero weights (as training would), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in hyper.heads_b.values():
            head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=g) * 0.3 / head.proj.in_features**0.5)
            head.proj.bias.copy_(torch.randn(head.proj.bias.shape, generator=g) * 0.05)


def _batch(student, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, 150000, (N, P), generator=g)
    prompt_mask = torch.ones(N, P, dtype=torch.bool)
    prompt_mask[0, 5:] = False
    input_ids = torch.randint(0, 150000, (N, T), generator=g)
    labels = torch.randint(0, 150000, (N, T), generator=g)
    embeds = student.get_input_embeddings()(prompt_ids).detach()
    return embeds, prompt_mask, input_ids, labels


@pytest.fixture(scope="module")
def student():
    return _build_student()


def test_init_output_equals_base_exactly(student):
    hyper = _build_hyper(student)
    embeds, mask, input_ids, _ = _batch(student)
    injector = LoRAInjector(student, hyper.targets, hyper.lora_scale)
    try:
        base = student(input_ids).logits
        with injector.weights(hyper(embeds, mask)):
            injected = student(input_ids).logits
        assert torch.equal(injected, base)
    finally:
        injector.remove()


def test_matches_per_sample_merged_reference(student):
    hyper = _build_hyper(student)
    _randomize_b(hyper)
    embeds, mask, input_ids, _ = _batch(student)
    injector = LoRAInjector(student, hyper.targets, hyper.lora_scale)
    try:
        with torch.no_grad():
            lora = hyper(embeds, mask)
            base = student(input_ids).logits
            with injector.weights(lora):
                injected = student(input_ids).logits
    finally:
        injector.remove()
    assert (injected - base).abs().max() > 1e-2  # the update is large enough to matter

    for n in range(N):
        merged = copy.deepcopy(student)
        modules = dict(merged.named_modules())
        with torch.no_grad():
            for name, (a, b) in lora.items():
                modules[name].weight += hyper.lora_scale * b[n] @ a[n]
            ref = merged(input_ids[n : n + 1]).logits[0]
        torch.testing.assert_close(injected[n], ref, rtol=1e-4, atol=1e-4)


def _hyper_grads(student, hyper, checkpointing: bool) -> dict[str, torch.Tensor]:
    embeds, mask, input_ids, labels = _batch(student)
    student.train()
    if checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    injector = LoRAInjector(student, hyper.targets, hyper.lora_scale)
    hyper.zero_grad(set_to_none=True)
    try:
        lora = hyper(embeds, mask)
        with injector.weights(lora):
            logits = student(input_ids).logits
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss.backward()
    finally:
        injector.remove()
        student.gradient_checkpointing_disable()
        student.eval()
    return {k: p.grad.clone() for k, p in hyper.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients(student):
    hyper = _build_hyper(student)
    _randomize_b(hyper)
    plain = _hyper_grads(student, hyper, checkpointing=False)
    ckpt = _hyper_grads(student, hyper, checkpointing=True)
    assert set(plain) == set(ckpt) == {k for k, _ in hyper.named_parameters()}
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-7)


def test_closing_the_context_before_backward_raises_under_checkpointing(student):
    hyper = _build_hyper(student)
    _randomize_b(hyper)
    embeds, mask, input_ids, labels = _batch(student)
    student.train()
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    injector = LoRAInjector(student, hyper.targets, hyper.lora_scale)
    try:
        with injector.weights(hyper(embeds, mask)):
            loss = F.cross_entropy(student(input_ids).logits.flatten(0, 1), labels.flatten())
        with pytest.raises(RuntimeError, match="keep `injector.weights"):
            loss.backward()
    finally:
        injector.remove()
        student.gradient_checkpointing_disable()
        student.eval()


@pytest.mark.parametrize("train_encoder", [True, False])
def test_gradients_reach_every_hypernet_parameter_and_no_student_parameter(student, train_encoder):
    hyper = _build_hyper(student, train_encoder=train_encoder)
    opt = torch.optim.Adam(hyper.optimizer_groups(), lr=1e-3)

    # Step 0: B == 0, so only the B projections get a gradient (dL/dA = B^T ... = 0).
    grads0 = _hyper_grads(student, hyper, checkpointing=True)
    nonzero0 = {k for k, g in grads0.items() if g.abs().max() > 0}
    assert nonzero0 == {k for k in grads0 if k.startswith("heads_b.") and ".proj." in k}
    opt.step()

    # After one step B != 0 and every trainable parameter of the hypernetwork learns (a frozen encoder: no gradient).
    grads1 = _hyper_grads(student, hyper, checkpointing=True)
    names = [k for k, p in hyper.named_parameters() if p.requires_grad]
    assert train_encoder == any(k.startswith("encoder.") for k in names)
    assert set(grads1) == set(names)
    assert [k for k in names if not grads1[k].abs().max() > 0] == []
    assert all(p.grad is None and not p.requires_grad for p in student.parameters())


def test_remove_restores_the_base_model(student):
    hyper = _build_hyper(student)
    _randomize_b(hyper)
    embeds, mask, input_ids, _ = _batch(student)
    with torch.no_grad():
        lora = hyper(embeds, mask)
        base = student(input_ids).logits
        injector = LoRAInjector(student, hyper.targets, hyper.lora_scale)
        with injector.weights(lora):
            assert not torch.equal(student(input_ids).logits, base)
        assert torch.equal(student(input_ids).logits, base)  # outside the context: a no-op
        injector.remove()
        with injector.weights(lora):
            assert torch.equal(student(input_ids).logits, base)  # hooks gone


def test_rejects_mismatched_weights(student):
    hyper = _build_hyper(student)
    embeds, mask, input_ids, _ = _batch(student)
    injector = LoRAInjector(student, hyper.targets, hyper.lora_scale)
    try:
        lora = hyper(embeds, mask)
        first = hyper.targets[0].name
        with pytest.raises(ValueError, match="do not match the targets"):
            with injector.weights({k: v for k, v in lora.items() if k != first}):
                pass
        a, b = lora[first]
        with pytest.raises(ValueError, match=first):
            with injector.weights({**lora, first: (a[:, :, :-1], b)}):
                pass
        with pytest.raises(RuntimeError, match="input batch 1 != LoRA batch 2"):
            with injector.weights(lora), torch.no_grad():
                student(input_ids[:1])
    finally:
        injector.remove()


# ---------------------------------------------------------------------------------------------
# FSDP2: fully_shard per decoder layer + root, non-reentrant activation checkpointing, 2 ranks.


def _fsdp_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        student = _build_student()
        hyper = _build_hyper(student)
        _randomize_b(hyper)
        reference = copy.deepcopy(student)
        ref_grads = _hyper_grads(reference, hyper, checkpointing=True)
        embeds, mask, input_ids, labels = _batch(reference)
        with torch.no_grad():
            ref_injector = LoRAInjector(reference, hyper.targets, hyper.lora_scale)
            with ref_injector.weights(hyper(embeds, mask)):
                ref_logits = reference(input_ids).logits

        mesh = init_device_mesh("cpu", (world,))
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in student.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(student, mesh=mesh)
        q_weight = student.get_submodule(hyper.targets[-1].name).weight
        assert isinstance(q_weight, DTensor) and q_weight.to_local().shape[0] == q_weight.shape[0] // world
        student.train()
        injector = LoRAInjector(student, hyper.targets, hyper.lora_scale)
        hyper.zero_grad(set_to_none=True)
        lora = hyper(embeds, mask)
        with injector.weights(lora):
            logits = student(input_ids).logits
            F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        torch.testing.assert_close(logits.detach(), ref_logits, rtol=1e-4, atol=1e-5)
        for k, p in hyper.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-7)
        assert all(p.grad is None for p in student.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_with_checkpointing_matches_unsharded(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "pg_init")), nprocs=2, join=True)
