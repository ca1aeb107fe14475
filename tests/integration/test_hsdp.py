"""Stage 2's multi-node path on CPU: 4 gloo processes build the 2 x 2 HSDP mesh ("replicate" x "shard") with
stage2_student.distributed, fully_shard a small module on it, and take one optimizer step.

Checked in every process: each parameter is sharded over "shard" and replicated over "replicate"; the
gradient equals the mean of the four ranks' gradients, computed here without FSDP from the same init; after
the step all four ranks hold identical full parameters; `broadcast_buffers` gives every rank rank 0's buffers.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 4
DIM = 8


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 2 * DIM), torch.nn.GELU(), torch.nn.Linear(2 * DIM, DIM))


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(3, DIM, generator=torch.Generator().manual_seed(100 + rank))


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) ** 2).mean()


def _worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank % 2),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    from stage2_student.distributed import ParallelDims, broadcast_buffers, build_mesh, cleanup, init_distributed

    env = init_distributed()
    try:
        assert env.world_size == WORLD and env.backend == "gloo"
        mesh = build_mesh(env, ParallelDims.for_world(WORLD, shard=2))
        assert mesh.mesh_dim_names == ("replicate", "shard") and tuple(mesh.shape) == (2, 2)

        # Reference without FSDP: the gradient of the mean loss over all ranks' batches, then one SGD step.
        reference = _model()
        sum(_loss(reference, _batch(r)) for r in range(WORLD)).div(WORLD).backward()
        ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
        ref_after = {n: p.detach() - 0.5 * p.grad for n, p in reference.named_parameters()}

        model = fully_shard(_model(), mesh=mesh)
        for name, p in model.named_parameters():
            assert tuple(p.placements) == (Replicate(), Shard(0)), (name, p.placements)
            assert p.to_local().shape[0] == p.shape[0] // 2  # half of dim 0 on each rank of a shard group
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        _loss(model, _batch(env.rank)).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), ref_grads[name], rtol=1e-5, atol=1e-6)
        optimizer.step()

        for name, p in model.named_parameters():
            full = p.full_tensor().detach()
            torch.testing.assert_close(full, ref_after[name], rtol=1e-5, atol=1e-6)
            gathered = [torch.empty_like(full) for _ in range(WORLD)]
            dist.all_gather(gathered, full)
            assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name}: replicas differ after the step"
        # The two shard groups are the replicas: rank r holds the same local shard as rank r +- 2.
        local = next(model.parameters()).to_local().detach().contiguous()
        shards = [torch.empty_like(local) for _ in range(WORLD)]
        dist.all_gather(shards, local)
        assert torch.equal(shards[0], shards[2]) and torch.equal(shards[1], shards[3])
        assert not torch.equal(shards[0], shards[1])

        # Buffers are not sharded: the trainer broadcasts rank 0's (the hypernetwork's calibration) to all.
        model.register_buffer("stat", torch.full((3,), float(env.rank + 1)))
        broadcast_buffers(model)
        assert torch.equal(model.stat, torch.ones(3)), (env.rank, model.stat)
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_hsdp_mesh_shards_within_and_replicates_across_groups():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
