"""`hyper.mode: static`: one trainable LoRA shared by every sample, behind the hypernetwork's interface.

The baseline the hypernetwork has to beat (and plain LoRA distillation against the cache): the same targets,
rank and alpha, A initialised as PEFT initialises lora_A (kaiming_uniform with a = sqrt(5), i.e. variance
1 / (3 d_in)) and B = 0, so at step 0 the student is exactly the base student. `forward` takes the prompt
embeddings only for their batch size and returns each target's (A, B) expanded over the batch, the shape
`HyperNetwork.forward` returns; the trainer, the injector, checkpoints and FSDP2 see no difference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.config import HyperConfig
from stage2_student.targets import Target


def _key(name: str) -> str:
    """Parameter names cannot hold '.': 'model.layers.3.self_attn.q_proj' -> 'model__layers__3__self_attn__q_proj'."""
    return name.replace(".", "__")


class StaticLoRA(nn.Module):
    """{target name: (A [N, r, d_in], B [N, d_out, r])}, the same A and B for every sample, fp32."""

    def __init__(self, hyper_cfg: HyperConfig, targets: list[Target]):
        super().__init__()
        if not targets:
            raise ValueError("StaticLoRA needs at least one target")
        self.targets = list(targets)
        self.rank = hyper_cfg.rank
        self.lora_scale = hyper_cfg.alpha / hyper_cfg.rank
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for t in self.targets:
            a = torch.empty(self.rank, t.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's lora_A init: U(-1/sqrt(d_in), 1/sqrt(d_in))
            self.a[_key(t.name)] = nn.Parameter(a)
            self.b[_key(t.name)] = nn.Parameter(torch.zeros(t.out_features, self.rank))

    def forward(
        self, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """prompt_embeds [N, P, E]: only N is read (a static LoRA does not depend on the task)."""
        n = prompt_embeds.shape[0]
        out = {}
        for t in self.targets:
            # repeat(), not expand(): under FSDP2 the unsharded parameters are freed when this module reshards after
            # its forward, and the injector reads A and B later (and again in backward), so the output must own its
            # memory; and it must not be a view either (FSDP2 warns about views returned from a wrapped forward).
            a, b = self.a[_key(t.name)], self.b[_key(t.name)]
            out[t.name] = (a.unsqueeze(0).repeat(n, 1, 1), b.unsqueeze(0).repeat(n, 1, 1))
        return out

    def optimizer_groups(self) -> list[dict]:
        """One Adam(W) group at the scheduled lr: a plain LoRA's A and B are the trained weights themselves
        (HyperNetwork.optimizer_groups has the same shape)."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def adapter(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{target name: (A [r, d_in], B [d_out, r])}: the one adapter, as export-lora writes it."""
        return {t.name: (self.a[_key(t.name)], self.b[_key(t.name)]) for t in self.targets}
