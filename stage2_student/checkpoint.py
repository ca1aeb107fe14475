"""Checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own shards.

Saved: the hypernetwork, the optimizer, the loop's own position (global step, phase, step within the
phase) and the RNG state; the resolved run config goes beside it as JSON. The learning rate is a pure
function of the global step (`schedule.lr_at`), so no scheduler object needs saving. A killed run
resumes from the newest complete checkpoint to the same hypernetwork as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

STEP_PREFIX = "step-"
LOOP_KEYS = ("step", "phase", "phase_step")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def _complete(root: str | Path) -> list[Path]:
    folder = Path(root) / "checkpoints"
    if not folder.exists():
        return []
    # DCP writes `.metadata` after every rank's shards; config.json is written after that by rank 0.
    return sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if (p / ".metadata").exists() and (p / "config.json").exists())


def latest_checkpoint(root: str | Path) -> Path | None:
    done = _complete(root)
    return done[-1] if done else None


def _state(hypernet, optimizer, loop: dict[str, int]) -> dict:
    return {
        "hypernet": get_model_state_dict(hypernet),
        "optimizer": get_optimizer_state_dict(hypernet, optimizer),
        "loop": {k: torch.tensor(loop.get(k, 0), dtype=torch.int64) for k in LOOP_KEYS},
        "rng": torch.get_rng_state(),
    }


def save(path: Path, hypernet, optimizer, loop: dict[str, int], config: dict, is_main: bool, barrier) -> None:
    dcp.save(_state(hypernet, optimizer, loop), checkpoint_id=str(path))
    barrier()
    if is_main:
        (path / "config.json").write_text(json.dumps(config, indent=1))


def load(path: Path, hypernet, optimizer) -> dict[str, int]:
    """Restore the hypernetwork and optimizer in place; return the saved loop position."""
    state = _state(hypernet, optimizer, {})
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(hypernet, state["hypernet"])
    set_optimizer_state_dict(hypernet, optimizer, state["optimizer"])
    torch.set_rng_state(state["rng"])
    return {k: int(v) for k, v in state["loop"].items()}


def saved_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def prune(root: str | Path, keep: int = 2) -> None:
    """Delete all but the newest `keep` complete checkpoints (call on rank 0 only)."""
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
