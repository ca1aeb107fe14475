"""Stage 2's data: cached samples -> padded batches with flattened teacher rows.

Reads the cache only through `cache_schema.CacheReader`. A batch of N samples becomes
  input_ids      [N, T]    padded with pad_id (right), attention over real tokens only
  prompt_ids     [N, P]    the task prompts the hypernetwork reads, with prompt_mask [N, P]
  row_sample     [R]       which sample each stored teacher row belongs to
  row_position   [R]       token index t of the row (the row predicts token t+1)
  topk_ids       [R, K]    teacher's top-K ids (rank order), topk_logprobs [R, K]
where R counts only rows inside the phase's context length (t + 1 < seq_len).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from cache_schema.manifest import dataset_fingerprint, heldout_ids
from common.errors import UserError


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    row_sample: torch.Tensor
    row_position: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    n_tokens: int

    def to(self, device: torch.device) -> Batch:
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return Batch(**moved)


def manifest_split(reader, manifest: str) -> tuple[list[int], list[int]]:
    """(train, heldout) cache indices as prepare-data's manifest marks them (the same on every rank). The
    manifest must be the one the cache was built from (its fingerprint is in the cache's root metadata)."""
    built_from, here = reader.meta.dataset.fingerprint, dataset_fingerprint(manifest)
    if built_from != here:
        raise UserError(f"manifest {manifest}: {here} is not the manifest cache {reader.path} was built from "
                        f"({built_from}); point `manifest` at that run's manifest")
    held = heldout_ids(manifest)
    train, heldout = [], []
    for i, sid in enumerate(reader.sample_ids):
        if sid not in held:
            raise UserError(f"cache {reader.path}: sample {sid!r} is not in manifest {manifest}")
        (heldout if held[sid] else train).append(i)
    return train, heldout


def phase_order(indices: list[int], samples: int | None, epochs: float, seed: int, phase: int) -> list[int]:
    """The phase's sample order: a fixed subset, then `epochs` seeded shuffles (a fractional last pass)."""
    rng = np.random.default_rng([seed, phase])
    chosen = list(indices) if samples is None else [indices[i] for i in rng.permutation(len(indices))[:samples]]
    order: list[int] = []
    for epoch in range(math.ceil(epochs)):
        perm = np.random.default_rng([seed, phase, epoch]).permutation(len(chosen))
        take = len(chosen) if epoch + 1 <= epochs else round(len(chosen) * (epochs - epoch))
        order.extend(chosen[j] for j in perm[:take])
    return order


def rank_batches(order: list[int], batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Deal global batches of batch_size*world samples; each rank takes its slice. The tail that cannot
    fill a global batch is dropped so that every rank runs the same number of steps."""
    global_bs = batch_size * world_size
    n = len(order) // global_bs
    return [order[b * global_bs + rank * batch_size : b * global_bs + (rank + 1) * batch_size] for b in range(n)]


@dataclass
class Plan:
    """Per phase, this rank's batches (lists of cache indices) and the global step at which it starts."""

    batches: list[list[list[int]]]
    starts: list[int]
    total_steps: int


def plan_phases(cfg, train_idx: list[int], rank: int, world_size: int) -> Plan:
    """Every phase's micro-batches for `rank` of `world_size`, cut to whole optimizer steps (UserError when no
    step fits: checked before launch too)."""
    batches, starts, step = [], [], 0
    per_step = cfg.train.grad_accum
    for p, phase in enumerate(cfg.train.phases):
        order = phase_order(train_idx, phase.samples, phase.epochs, cfg.train.seed, p)
        micro = rank_batches(order, cfg.train.batch_size, rank, world_size)
        micro = micro[: len(micro) // per_step * per_step]
        batches.append(micro)
        starts.append(step)
        step += len(micro) // per_step
    if cfg.train.max_steps is not None:
        step = min(step, cfg.train.max_steps)
    if step == 0:
        raise UserError(
            f"train: no optimizer step fits: {len(train_idx)} training samples for batch_size={cfg.train.batch_size} "
            f"x {world_size} ranks x grad_accum={cfg.train.grad_accum}"
        )
    return Plan(batches, starts, step)


def eval_batches(heldout_idx: list[int], batch_size: int, rank: int, world_size: int) -> tuple[list[list[int]], list[bool]]:
    """This rank's held-out batches and whether each counts. Every rank runs the same number of forwards
    (FSDP's collectives must match): ranks with fewer batches repeat one and do not count it."""
    batches = [heldout_idx[i : i + batch_size] for i in range(0, len(heldout_idx), batch_size)]
    mine = batches[rank::world_size]
    per_rank = math.ceil(len(batches) / world_size)
    pad = per_rank - len(mine)
    return mine + batches[:1] * pad, [True] * len(mine) + [False] * pad


class CacheSamples(torch.utils.data.Dataset):
    """Map-style dataset of cached samples cut to `seq_len`; safe in DataLoader workers."""

    def __init__(self, reader, seq_len: int):
        self.reader = reader
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        s = self.reader[index]
        keep = s.positions + 1 < self.seq_len
        return {
            "input_ids": s.input_ids[: self.seq_len],
            "prompt_ids": s.prompt_ids,
            "positions": s.positions[keep],
            "topk_ids": s.topk_ids[keep],
            "topk_logprobs": s.topk_logprobs[keep],
        }


def pad_prompts(prompts: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id arrays -> (prompt_ids [N, P] right-padded with pad_id, prompt_mask [N, P], True = real token)."""
    p_max = max(1, max(len(p) for p in prompts))
    prompt_ids = torch.full((len(prompts), p_max), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), p_max), dtype=torch.bool)
    for i, p in enumerate(prompts):
        prompt_ids[i, : len(p)] = torch.as_tensor(np.asarray(p, dtype=np.int64))
        prompt_mask[i, : len(p)] = True
    return prompt_ids, prompt_mask


def calibration_prompts(reader, indices: list[int], count: int, batch_size: int, pad_id: int):
    """Batches (prompt_ids, prompt_mask) of the task prompts of `count` samples spread evenly over `indices` (in
    their order; the same on every rank), for HyperNetwork.calibrate."""
    step = max(1, len(indices) // max(count, 1))
    chosen = indices[::step][:count]
    for i in range(0, len(chosen), batch_size):
        yield pad_prompts([reader.prompt_ids(j) for j in chosen[i : i + batch_size]], pad_id)


def collate(items: list[dict], pad_id: int) -> Batch:
    n = len(items)
    t_max = max(len(x["input_ids"]) for x in items)
    input_ids = torch.full((n, t_max), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t_max), dtype=torch.long)
    for i, x in enumerate(items):
        t = len(x["input_ids"])
        input_ids[i, :t] = torch.as_tensor(x["input_ids"], dtype=torch.long)
        attention_mask[i, :t] = 1
    prompt_ids, prompt_mask = pad_prompts([x["prompt_ids"] for x in items], pad_id)
    rows = [len(x["positions"]) for x in items]
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        row_sample=torch.repeat_interleave(torch.arange(n), torch.tensor(rows)),
        row_position=torch.as_tensor(np.concatenate([x["positions"] for x in items]), dtype=torch.long),
        topk_ids=torch.as_tensor(np.concatenate([x["topk_ids"] for x in items]), dtype=torch.long),
        topk_logprobs=torch.as_tensor(np.concatenate([x["topk_logprobs"] for x in items]), dtype=torch.float32),
        n_tokens=int(attention_mask.sum()),
    )


def make_loader(reader, batches: list[list[int]], seq_len: int, pad_id: int, num_workers: int, pin: bool):
    """A DataLoader over precomputed per-rank batches (resume = slice `batches`)."""
    return torch.utils.data.DataLoader(
        CacheSamples(reader, seq_len),
        batch_sampler=batches,
        collate_fn=functools.partial(collate, pad_id=pad_id),
        num_workers=num_workers,
        pin_memory=pin,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
