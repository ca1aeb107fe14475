"""The distillation model, and `build_distill_model`, the one place it is assembled.

    student (frozen) + targets (hyper.targets resolved on it) + LoRA writer (hyper.mode: the HyperNetwork, or a
    StaticLoRA shared by every sample) + LoRAInjector (hooks on the targets, scale = the writer's alpha / rank)
    + loss settings (train.loss, temperature, loss_chunk)

The trainer, preflight, export-lora, param-count and the benchmarks all build through `build_distill_model`,
so a size in `hyper` (head_chunk included) means the same thing everywhere. The student may sit on the meta
device (export and param-count only need names and shapes).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from common.config import HyperConfig, RunConfig
from stage2_student.hypernet import HyperNetwork
from stage2_student.lora import LoRAInjector, LoRAWeights
from stage2_student.losses import EVAL_KIND, DistillOutput, TeacherRows, distill_loss, training_kind
from stage2_student.static_lora import StaticLoRA
from stage2_student.targets import Target, resolve_targets

HYPER_MODES = ("hypernetwork", "static")


@dataclass(frozen=True)
class LossSettings:
    train_kind: str
    """What the run trains on (losses.training_kind)."""
    temperature: float
    chunk: int
    """Rows per lm_head chunk."""


class DistillModel(nn.Module):
    """The frozen student, the LoRA writer (`hypernet`) and the loss in one module, so that FSDP2 gathers the
    student's embedding table and lm_head (root unit) exactly while they are used.

    `hypernet` is whatever writes the LoRA: a HyperNetwork, or a StaticLoRA in static mode (the name is the
    checkpoints' key for both)."""

    def __init__(self, student: nn.Module, hypernet: nn.Module, injector: LoRAInjector, loss: LossSettings):
        super().__init__()
        self.student, self.hypernet, self.injector = student, hypernet, injector
        self.loss = loss

    @property
    def targets(self) -> list[Target]:
        return self.hypernet.targets

    def lora_scope(self) -> AbstractContextManager[None]:
        """Open around forward AND backward: the LoRA weights that forward makes live exactly this long."""
        return self.injector.scope()

    @torch.no_grad()
    def prompt_embeds(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Task prompts [N, P] -> what the prompt encoder reads: the student's own (frozen) input embeddings, fp32."""
        return self.student.get_input_embeddings()(prompt_ids).float()

    def lora_weights(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> LoRAWeights:
        """Task prompts [N, P] -> per-sample (A, B) for every target."""
        return self.hypernet(self.prompt_embeds(prompt_ids), prompt_mask)

    def calibrate(self, prompts: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float] | None:
        """(prompt_ids [N, P], prompt_mask [N, P]) batches of training prompts -> HyperNetwork.calibrate's report;
        None for a writer without a prompt encoder (static)."""
        if not hasattr(self.hypernet, "calibrate"):
            return None
        return self.hypernet.calibrate((self.prompt_embeds(ids), mask) for ids, mask in prompts)

    def forward(self, batch, kind: str | None = None, teacher_rows: TeacherRows | None = None) -> DistillOutput:
        """The loss of `kind` (default: what the run trains on) at the batch's rows, inside `lora_scope()`:
        the cache's rows for a top-K kind, `teacher_rows` (the teacher's hidden states there) for full_vocab."""
        # The weights stay set through backward (checkpointed blocks recompute their forward there); the
        # scope the caller opened clears them.
        self.injector.set(self.lora_weights(batch.prompt_ids, batch.prompt_mask))
        # Right padding needs no attention mask: causal attention and the causal DeltaNet recurrence
        # never let a real token see a later pad.
        hidden = self.student.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state  # [N, T, H]
        rows = hidden[batch.row_sample, batch.row_position]  # [R, H]
        return distill_loss(
            kind or self.loss.train_kind,
            rows,
            self.student.lm_head.weight,
            topk_ids=batch.topk_ids,
            topk_logprobs=batch.topk_logprobs,
            teacher=teacher_rows,
            temperature=self.loss.temperature,
            chunk=self.loss.chunk,
        )


def build_lora_writer(hyper_cfg: HyperConfig, targets: list[Target], embed_dim: int) -> nn.Module:
    """hyper.mode -> the module that writes the LoRA: (prompt embeds [N, P, E], mask [N, P]) ->
    {target: (A [N, r, d_in], B [N, d_out, r])}, with `.targets`, `.rank` and `.lora_scale`."""
    if hyper_cfg.mode == "static":
        return StaticLoRA(hyper_cfg, targets)
    if hyper_cfg.mode == "hypernetwork":
        return HyperNetwork(hyper_cfg, targets, embed_dim=embed_dim)
    raise ValueError(f"hyper.mode {hyper_cfg.mode!r}: expected one of {HYPER_MODES}")


def build_distill_model(cfg: RunConfig, student: nn.Module) -> DistillModel:
    """The distillation model for `student` (real or on the meta device): targets resolved from hyper.targets
    (UserError for a pattern that matches nothing), the LoRA writer of hyper.mode, its injector, the loss.

    The writer's parameters are created on the current default device and drawn from the current RNG: seed
    first for a reproducible init."""
    targets = resolve_targets(student, cfg.hyper.targets)
    writer = build_lora_writer(cfg.hyper, targets, embed_dim=student.config.hidden_size)
    injector = LoRAInjector(student, targets, scale=writer.lora_scale)
    t = cfg.train
    loss = LossSettings(training_kind(t.online_teacher, t.loss), t.temperature, t.loss_chunk)
    return DistillModel(student, writer, injector, loss)


__all__ = ["EVAL_KIND", "HYPER_MODES", "DistillModel", "LossSettings", "build_distill_model", "build_lora_writer"]
