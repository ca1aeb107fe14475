"""The frozen student loaded once (rank 0) and broadcast into FSDP2 shards built on the meta device.

Two gloo processes on CPU, the tiny student, the trainer's own sharding (activation checkpointing, then
`parallelize` with a hypernetwork beside the student). Checked on both ranks: only rank 0 calls
from_pretrained; the gathered student state dict equals a plain load's exactly; the non-persistent buffers
(rotary inv_freq, absent from state dicts) equal the plain load's and the sharded student's logits equal
the plain model's; the hypernetwork is not wiped by the student's materialisation. Then a 2-rank training
run starts from the same held-out KL as one process with the same config.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from common.config import load_config
from tests.pipeline_helpers import REPO, TRAIN, config_overrides

pytestmark = pytest.mark.distributed

WORLD = 2
HYPER = [s for s in TRAIN if s.startswith("hyper.")]


class _Logits(nn.Module):
    """Stands in for DistillModel: the student and the hypernetwork under one FSDP root."""

    def __init__(self, student: nn.Module, hypernet: nn.Module):
        super().__init__()
        self.student, self.hypernet = student, hypernet

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.student(input_ids=input_ids, use_cache=False).logits


def _worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    from common.models import load_causal_lm
    from stage2_student import distributed
    from stage2_student.hypernet import HyperNetwork
    from stage2_student.targets import resolve_targets

    cfg = load_config(REPO / "configs" / "demo.yaml", HYPER)
    env = distributed.init_distributed()
    try:
        # Count weight loads on this rank: rank > 0 must build the student without opening the checkpoint.
        loads = []
        original = AutoModelForCausalLM.from_pretrained.__func__

        def counting(cls, *args, **kwargs):
            loads.append(args[0])
            return original(cls, *args, **kwargs)

        AutoModelForCausalLM.from_pretrained = classmethod(counting)
        try:
            torch.manual_seed(cfg.train.seed)
            student, full_state = distributed.load_student(cfg.student, env)
            targets = resolve_targets(student, cfg.hyper.targets)
            hypernet = HyperNetwork(cfg.hyper, targets, student.config.hidden_size)
        finally:
            AutoModelForCausalLM.from_pretrained = classmethod(original)
        assert len(loads) == (1 if rank == 0 else 0), f"rank {rank} loaded the weights {len(loads)} times"
        assert all(p.is_meta for p in student.parameters()) == (rank > 0)

        # The reference: what every rank loaded before, and the hypernetwork as one process seeds it.
        plain = load_causal_lm(cfg.student.model, cfg.student.dtype)
        torch.manual_seed(cfg.train.seed)
        plain_hyper = HyperNetwork(cfg.hyper, targets, plain.config.hidden_size).state_dict()

        model = _Logits(student, hypernet)
        distributed.apply_activation_checkpointing(student)
        mesh = distributed.build_mesh(env, distributed.ParallelDims.for_world(WORLD))
        distributed.parallelize(model, student, hypernet, mesh)
        distributed.materialize_student(student, full_state, env)
        assert full_state == {}  # rank 0's full copy released

        options = StateDictOptions(full_state_dict=True)
        gathered = get_model_state_dict(student, options=options)
        expected = plain.state_dict()
        assert gathered.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(gathered[name], value), f"rank {rank}: {name} differs from the plain load"
        for name, value in get_model_state_dict(hypernet, options=options).items():
            assert torch.equal(value, plain_hyper[name]), f"rank {rank}: hypernetwork {name} was not kept"

        # Non-persistent buffers: in no state dict, so checked by name and through a forward.
        buffers = {n.replace("_checkpoint_wrapped_module.", ""): b for n, b in student.named_buffers()}
        for name, value in plain.named_buffers():
            assert torch.equal(buffers[name], value), f"rank {rank}: buffer {name} differs"
        ids = torch.randint(0, 151_000, (2, 24), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), plain(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_meta_student_matches_plain_load_on_every_rank():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_two_rank_run_starts_from_single_process_heldout_kl(hf_cache_run, two_rank_run, tmp_path):
    """The shared 2-rank run's step-0 evaluation (B = 0: the base student) equals one process's."""
    from stage2_student.distributed import DistEnv
    from stage2_student.train import train

    cache_cfg, _ = hf_cache_run
    out, _ = two_rank_run
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    two = next(m for m in metrics if m["split"] == "eval" and m["step"] == 0)

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        *config_overrides(cache_cfg), f"train.output_dir={tmp_path / 'one'}", *TRAIN, "train.max_steps=1"])  # fmt: skip
    one = train(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    assert two["rows"] > 0
    assert two["kl"] == pytest.approx(one["kl_before"], rel=1e-5)
