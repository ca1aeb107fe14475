"""Hypernetwork size for a student, from its transformers config alone (meta device, no weights).

    hyperdistill param-count                                         # the config's student
    hyperdistill param-count --set student.model=Qwen/Qwen3-Coder-Next  # the real one, from its published config
"""

from __future__ import annotations

from collections import Counter

import torch

from common.config import RunConfig
from stage2_student.model import build_distill_model


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_hypernet_params(cfg: RunConfig, student_config) -> dict:
    """Targets by kind, parameters (the hypernetwork's per component, or the static LoRA's), in total and
    those that train (a frozen encoder does not: hyper.train_encoder), and the size of the LoRA written per
    sample, for the student described by `student_config`:
    the model `build_distill_model` builds for `cfg`, on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(student_config)
        model = build_distill_model(cfg, student)
    writer, targets = model.hypernet, model.targets
    if cfg.hyper.mode == "static":
        components = {"lora_a": _numel(writer.a), "lora_b": _numel(writer.b)}
    else:
        components = {
            "encoder": _numel(writer.encoder),
            "generator": _numel(writer.generator) + _numel(writer.layer_emb) + _numel(writer.kind_emb),
            "heads_a": _numel(writer.heads_a),
            "heads_b": _numel(writer.heads_b),
        }
    return {
        "num_targets": len(targets),
        "targets_by_kind": dict(sorted(Counter(t.kind for t in targets).items())),
        "shapes": sorted({t.shape_key for t in targets}),
        "params": {**components, "total": _numel(writer),
                   "trainable": sum(p.numel() for p in writer.parameters() if p.requires_grad)},
        "lora_params_per_sample": sum(cfg.hyper.rank * (t.in_features + t.out_features) for t in targets),
        "student_params": _numel(student),
    }
