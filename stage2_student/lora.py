"""Per-sample LoRA on the frozen student: y = W x + scale * B_n (A_n x) for sample n of the batch.

Nothing is merged into the frozen weights: a forward hook on each target nn.Linear adds the delta
to its output. The hooks are registered once; `with injector.weights(lora):` makes a batch's
(A, B) visible to them. Outside the context the hooks return None and the model is exactly the
base model. When the weights can only be made inside a module's forward (the trainer's DistillModel:
FSDP2 gathers what the hypernetwork reads there), `with injector.scope():` opens the context and that
forward `set`s the weights into it; they are cleared when the scope closes, after backward.

Keep the context open across `loss.backward()`: with non-reentrant activation checkpointing
(torch.utils.checkpoint(use_reentrant=False), transformers' default) the blocks' forward runs
again DURING backward, hooks included, and must see the same weights. A recomputation without
them would silently produce wrong activations, so a hook that fires inside a backward pass while
no weights are set raises instead.

FSDP2: `fully_shard` wraps the decoder blocks; the hooks sit on the Linear modules inside and read
only the Linear's input and output, so they are indifferent to how its weight is sharded. Reentrant
checkpointing is not supported (it would not propagate gradients to A and B).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from stage2_student.targets import Target

LoRAWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""target name -> (A [N, r, d_in], B [N, d_out, r]), as HyperNetwork.forward returns."""


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """x [N, ..., d_in], A [N, r, d_in], B [N, d_out, r] -> scale * B (A x) [N, ..., d_out], fp32."""
    n = x.shape[0]
    xf = x.float().reshape(n, -1, x.shape[-1])  # [N, T, d_in]
    xa = torch.bmm(xf, a.float().transpose(1, 2))  # [N, T, r]
    delta = torch.bmm(xa, b.float().transpose(1, 2)) * scale  # [N, T, d_out]
    return delta.reshape(*x.shape[:-1], b.shape[1])


class LoRAInjector:
    """Forward hooks that add per-sample LoRA deltas to the target linears of `model`."""

    def __init__(self, model: nn.Module, targets: list[Target], scale: float):
        self.targets = {t.name: t for t in targets}
        self.scale = scale
        self._active: LoRAWeights | None = None
        self._scoped = False
        modules = dict(model.named_modules())
        missing = [name for name in self.targets if name not in modules]
        if missing:
            raise ValueError(f"targets not found in the model: {missing[:4]}")
        self._handles = [modules[name].register_forward_hook(self._hook_for(name)) for name in self.targets]

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._active is None:
                # -1 outside backward; anything else means a checkpointed block is being recomputed.
                if torch._C._current_graph_task_id() != -1:
                    raise RuntimeError(
                        f"{name} recomputed during backward without LoRA weights: keep "
                        "`injector.weights(...)` open across loss.backward()"
                    )
                return None
            a, b = self._active[name]
            x = args[0]
            if x.shape[0] != a.shape[0]:
                raise RuntimeError(f"{name}: input batch {x.shape[0]} != LoRA batch {a.shape[0]}")
            return output + lora_delta(x, a, b, self.scale).to(output.dtype)

        return hook

    @contextmanager
    def scope(self) -> Iterator[None]:
        """The one context in which LoRA weights exist: `set` them inside (once), and they apply to every
        forward and checkpoint recomputation until the block exits (keep backward inside it)."""
        if self._scoped:
            raise RuntimeError("a LoRA scope is already open (scopes do not nest)")
        self._scoped = True
        try:
            yield
        finally:
            self._active = None
            self._scoped = False

    def set(self, lora: LoRAWeights) -> None:
        """Apply `lora` until the enclosing `scope()` closes (for a module's forward that makes the weights)."""
        if not self._scoped:
            raise RuntimeError("LoRA weights set outside `injector.scope()`: nothing would clear them")
        if self._active is not None:
            raise RuntimeError("LoRA weights are already set in this scope")
        self._check(lora)
        self._active = lora

    @contextmanager
    def weights(self, lora: LoRAWeights) -> Iterator[None]:
        """Apply `lora` to every forward (and checkpoint recomputation) inside the block."""
        with self.scope():
            self.set(lora)
            yield

    def remove(self) -> None:
        """Remove the hooks: the model is the plain base model again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _check(self, lora: LoRAWeights) -> None:
        if set(lora) != set(self.targets):
            extra, missing = sorted(set(lora) - set(self.targets)), sorted(set(self.targets) - set(lora))
            raise ValueError(f"LoRA weights do not match the targets (missing {missing[:4]}, unknown {extra[:4]})")
        batch = None
        for name, (a, b) in lora.items():
            t = self.targets[name]
            if a.dim() != 3 or b.dim() != 3 or a.shape[2] != t.in_features or b.shape[1] != t.out_features:
                raise ValueError(
                    f"{name}: expected A [N, r, {t.in_features}] and B [N, {t.out_features}, r], "
                    f"got {tuple(a.shape)} and {tuple(b.shape)}"
                )
            if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2] or batch not in (None, a.shape[0]):
                raise ValueError(f"{name}: inconsistent batch or rank, A {tuple(a.shape)}, B {tuple(b.shape)}")
            batch = a.shape[0]
