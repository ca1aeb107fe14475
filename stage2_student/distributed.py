"""Everything torch.distributed in stage 2: process-group set-up, the device mesh, and parallelisation.

Model and loss code never call torch.distributed; the trainer calls these small functions in order
(torchtitan's shape): `init_distributed` -> `load_student` -> `build_mesh` -> `apply_activation_checkpointing`
-> `parallelize` -> `materialize_student` -> ... -> `cleanup`. Launch with torchrun
(`hyperdistill train-student --nproc N`).

The frozen student is read from disk once, by rank 0 (`load_student`); every other rank builds the same
architecture on the meta device, so an 80B bf16 student costs one 160 GB host copy (rank 0's), not one per
rank. FSDP2 shards the meta and the real modules alike; `materialize_student` then allocates the other ranks'
shards (`to_empty`, the student only: the hypernetwork is real and seeded), fills every rank's shards from
rank 0's full state dict by broadcast (torch.distributed.checkpoint's `set_model_state_dict`), and copies rank
0's non-persistent buffers (rotary `inv_freq` and the like: not in any state dict, garbage after `to_empty`).
Alone (no process group) the student is simply loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from common.models import build_on_meta, load_causal_lm


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl" on GPUs, "gloo" on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class ParallelDims:
    """Data-parallel mesh shape: `replicate` groups (nodes, HSDP) x `shard` ranks (FSDP within a node)."""

    replicate: int
    shard: int

    def __post_init__(self) -> None:
        if self.replicate < 1 or self.shard < 1:
            raise ValueError(f"mesh dims must be >= 1, got replicate={self.replicate} shard={self.shard}")

    @property
    def world_size(self) -> int:
        return self.replicate * self.shard

    @classmethod
    def for_world(cls, world_size: int, shard: int | None = None) -> ParallelDims:
        """FSDP over `shard` ranks (default: all), replicated across the rest; shard must divide world."""
        shard = shard or world_size
        if world_size % shard:
            raise ValueError(f"shard size {shard} does not divide world size {world_size}")
        return cls(replicate=world_size // shard, shard=shard)


def init_distributed() -> DistEnv:
    """Join the torchrun process group (or run alone when not launched by torchrun)."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        local_rank, device, backend = int(os.environ.get("LOCAL_RANK", 0)), torch.device("cpu"), "gloo"
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)
    return DistEnv(0, 1, 0, device, backend)


def build_mesh(env: DistEnv, dims: ParallelDims) -> DeviceMesh | None:
    """A 1-D ("shard",) mesh for FSDP, or 2-D ("replicate", "shard") for HSDP across nodes."""
    if not dist.is_initialized():
        return None
    if dims.world_size != env.world_size:
        raise ValueError(f"mesh {dims} needs {dims.world_size} ranks, launched with {env.world_size}")
    if dims.replicate == 1:
        return init_device_mesh(env.device.type, (dims.shard,), mesh_dim_names=("shard",))
    return init_device_mesh(env.device.type, (dims.replicate, dims.shard), mesh_dim_names=("replicate", "shard"))


def decoder_layers(student: nn.Module) -> nn.ModuleList:
    """The student's transformer blocks (`model.layers` in HF causal LMs)."""
    return student.model.layers


def apply_activation_checkpointing(student: nn.Module) -> None:
    """Recompute each decoder block in backward (non-reentrant, so LoRA hooks rerun with their weights)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(student)
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block)


def parallelize(distill: nn.Module, student: nn.Module, hypernet: nn.Module, mesh: DeviceMesh | None) -> None:
    """FSDP2: one unit per student block (bf16), one for the hypernetwork (fp32), the root for the rest.

    Units hold one dtype each. The frozen student's embedding table and lm_head stay in the root unit,
    so they are gathered only inside the root's forward/backward, where the loss and the prompt
    encoder use them. With a 2-D mesh this is HSDP: sharded within a node, replicated across nodes.
    """
    if mesh is None:
        return
    for block in decoder_layers(student):
        fully_shard(block, mesh=mesh)
    fully_shard(hypernet, mesh=mesh)
    # The root is used right after its forward by backward: keep it gathered (torchtitan does the same).
    fully_shard(distill, mesh=mesh, reshard_after_forward=False)


def load_student(student_cfg, env: DistEnv) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The frozen student and rank 0's full state dict for `materialize_student` (None when alone).

    Rank 0 (or a lone process) loads the weights on CPU; ranks > 0 build the architecture on the meta device
    and never open the weight files. The RNG is left as it was: from_pretrained draws from it and the meta
    build does not, and the hypernetwork built next must be initialised identically on every rank.
    """
    s = student_cfg
    with torch.random.fork_rng(devices=[]):
        if env.is_main:
            student = load_causal_lm(s.model, s.dtype, s.revision, s.trust_remote_code)
        else:
            student = build_on_meta(s.model, s.dtype, s.revision, s.trust_remote_code)
    student.requires_grad_(False)
    if not dist.is_initialized():
        return student, None
    # Taken before fully_shard replaces the parameters by shards: these references keep rank 0's full copy.
    return student, (student.state_dict() if env.is_main else {})


def materialize_student(student: nn.Module, full_state: dict[str, torch.Tensor] | None, env: DistEnv) -> None:
    """After `parallelize`: give every rank real shards holding rank 0's weights, on env.device.

    `full_state` is what `load_student` returned; it is emptied here, freeing rank 0's full copy."""
    if full_state is None:
        return
    if any(t.is_meta for t in [*student.parameters(), *student.buffers()]):
        student.to_empty(device=env.device)  # storage only; the values come next
    else:
        student.to(env.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(student, full_state, options=options)
    full_state.clear()
    _broadcast_non_persistent_buffers(student, env)


def _broadcast_non_persistent_buffers(module: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers registered with persistent=False (absent from state dicts) to every rank.

    Rank 0 sends each buffer's shape and dtype first, so a rank whose meta build differs in dtype still
    ends up with rank 0's exact tensor."""
    owners = {
        f"{prefix}.{name}" if prefix else name: (sub, name)
        for prefix, sub in module.named_modules()
        for name in sub._non_persistent_buffers_set
        if sub._buffers.get(name) is not None
    }
    names = sorted(owners)
    specs = [[(tuple(getattr(*owners[n]).shape), getattr(*owners[n]).dtype) for n in names] if env.is_main else None]
    dist.broadcast_object_list(specs, src=0)
    if len(specs[0]) != len(names):
        raise RuntimeError(f"rank {env.rank}: {len(names)} non-persistent buffers, rank 0 has {len(specs[0])}")
    for name, (shape, dtype) in zip(names, specs[0]):
        sub, attr = owners[name]
        value = sub._buffers[attr].to(env.device) if env.is_main else torch.empty(shape, dtype=dtype, device=env.device)
        dist.broadcast(value, src=0)
        sub._buffers[attr] = value


def broadcast_buffers(module: nn.Module) -> None:
    """Overwrite every rank's buffers of `module` with rank 0's, in place (same shapes everywhere; no-op alone)."""
    if dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small metrics tensor across ranks (no-op when alone)."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_from_main(value):
    """Rank 0's `value` (any picklable object) on every rank (itself when alone)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
