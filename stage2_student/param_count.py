"""Hypernetwork size for a student, from its transformers config alone (meta device, no weights).

    hyperdistill param-count                                         # the config's student
    hyperdistill param-count --set student.model=Qwen/Qwen3-Coder-Next  # the real one, from its published config
"""

from __future__ import annotations

from collections import Counter

import torch

from common.config import HyperConfig
from stage2_student.hypernet import HyperNetwork
from stage2_student.targets import resolve_targets


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_hypernet_params(hyper_cfg: HyperConfig, student_config) -> dict:
    """Targets by kind, hypernetwork parameters per component and in total, and the size of the
    LoRA it writes per sample, for the student described by `student_config`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(student_config)
        targets = resolve_targets(student, hyper_cfg.targets)
        hyper = HyperNetwork(hyper_cfg, targets, embed_dim=student_config.hidden_size)
    components = {
        "encoder": _numel(hyper.encoder),
        "generator": _numel(hyper.generator) + _numel(hyper.layer_emb) + _numel(hyper.kind_emb),
        "heads_a": _numel(hyper.heads_a),
        "heads_b": _numel(hyper.heads_b),
    }
    return {
        "num_targets": len(targets),
        "targets_by_kind": dict(sorted(Counter(t.kind for t in targets).items())),
        "shapes": sorted(hyper.groups),
        "params": {**components, "total": _numel(hyper)},
        "lora_params_per_sample": sum(hyper_cfg.rank * (t.in_features + t.out_features) for t in targets),
        "student_params": _numel(student),
    }
