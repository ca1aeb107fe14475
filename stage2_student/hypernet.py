"""The hypernetwork: task prompt -> one LoRA (A, B) per target linear, per sample.

    prompt token embeddings [N, P, E]  (the frozen student's own input embeddings, detached)
      -> LayerNorm -> Linear(E, D) + sinusoidal positions
      -> pre-norm TransformerEncoder (encoder_layers x encoder_heads)
      -> attention pooling with one query -> [N, D]          (the encoder: frozen unless hyper.train_encoder)
      -> standardised per feature over training prompts (`calibrate`) -> task vector z [N, D]
    for each target t = (layer l, kind m):
      h_t = MLP(z + layer_emb[l] + kind_emb[m])                       [N, G]
      A_t = head_A[shape(t)](h_t)  [N, r, d_in];  B_t = head_B[shape(t)](h_t)  [N, d_out, r]

Output heads: chunked, one pair per distinct (d_in, d_out).
    A dense head Linear(G, r * (d_in + d_out)) would cost 512 * 8 * 14336 = 59M parameters for the
    real student's in_proj_qkvz alone (~145M over its five shapes). Instead each head emits its
    matrix in column chunks of `head_chunk` (<= 256) entries along d: for chunk j,
        g_j = GELU(LN(h) * (1 + scale_j) + shift_j)          (a per-chunk FiLM; shift_j random at init)
        chunk_j = Linear(G, r * c)(LN(g_j))                   (one projection shared by all chunks)
    The projection is shared, so parameters grow with r * c * G per head rather than with d, and the
    FiLM before the nonlinearity gives each chunk its own function of the task (a plain per-chunk
    additive embedding after a linear map would give every chunk the same task-dependent part).
    Real student: 9.9M head parameters instead of ~145M (12.7M for the whole hypernetwork).

Initialisation:
    - every B projection is zero (weight and bias), so every B is exactly 0 at step 0 and the
      student with injection equals the base student exactly;
    - A projections are N(0, 1 / (3 d_in G)) on unit-variance inputs, so A's entries have the
      variance of PEFT's default kaiming_uniform(a=sqrt(5)) LoRA A, whatever the task.

Standardisation of z (`calibrate`, once before the first step; data-dependent initialisation as in weight
normalisation, Salimans & Kingma 2016):
    A run's prompts share most of their text (the issue template, the repository field), so a fresh encoder's
    pooled vector is mostly the same for every prompt. On the testbed at initialisation (24 tasks, 2 prompts
    each) 90 % of its norm was the mean over prompts, and 95 % of the features the heads' projections read, after
    the layer and kind embeddings and the chunk FiLM. Adam's steps on a projection follow its gradient's biggest
    part, the shared one, so the part of B that differs between prompts, the only part that can make the LoRA
    depend on the task, grew hundreds of times slower than the shared part: after 100 steps the LoRAs of two tasks
    differed by 0.13 % of their norm. The shared LoRA needs no shared features: the heads' biases and the layer and
    kind embeddings carry it. So the trainer measures the pooled vector's mean and std per feature over training
    prompts and fixes z = (pooled - mean) / std: what differs between prompts is then the whole of z, and 37 % of
    the heads' features (testbed, at initialisation; benchmarks/hyper.py). The two statistics are buffers:
    checkpoints, resume and export-lora carry them; an uncalibrated hypernetwork uses 0 and 1. With the whole
    first user message as its prompt, z differs as much between two issues of one task as between tasks; the
    testbed's hypernetwork reads the repository alone (`data.prompt: repository`).

The encoder stays as initialised (`hyper.train_encoder`, off by default). Text-to-LoRA (Charakorn et al. 2025) also
trains only what comes after a fixed encoder: it embeds the task description with a pretrained text encoder
(gte-large-en-v1.5, or Mistral-7B-Instruct's activations). Here:
    Early in training every task wants the same LoRA, the shared part; whatever part of the LoRA follows z is then
    noise that raises the loss, and the loss's gradient into a trainable encoder removes it by giving every prompt
    the same z. On the testbed (seed 2, 200 steps, lr 1e-3) a trained encoder did exactly that: across the 24 seen
    tasks' prompts z's per-feature std fell from 1.02 to 0.11 while its mean grew from norm 0.44 to 63; the
    generator's output then differed between tasks by 0.4 % of its RMS (56 % at step 0), the LoRAs by 0.2 %, and
    the convention tokens stayed at chance. Frozen, the encoder is a fixed random map of the prompt's token
    embeddings, standardised by `calibrate` (exact for the whole run, since the encoder no longer moves), and the
    generator and heads learn the task lookup from it: the same run's LoRAs differed between tasks by 50 % and it
    got 73 % of the seen tasks' convention tokens right (BENCHMARKS.md, "Does the hypernetwork earn its keep?").
    A frozen encoder gets no gradient and no optimizer state; checkpoints and export-lora carry its weights.

Learning rate of the head projections (`optimizer_groups`): lr / G, all else at lr.
    Adam moves every weight by about lr per step whatever its gradient's scale. An emitted entry is
    B_i = sum_j W_ij u_j + b_i over the G entries of u = out_norm(g), whose RMS is 1 by construction; for one
    sample and chunk the gradients of row i's weights are dL/dB_i * u_j, so Adam's first step moves B_i by
    lr * sum_j |u_j| ~ 0.8 G lr: about 0.8 G times what a plain LoRA's B entry moves at the same lr (A alike,
    once B != 0). At the demo's G = 256 that made lr 1e-4 act like a plain LoRA at ~2e-2, and at lr 1e-3 the
    deltas s*B*A grew to 35-140x their frozen weights' norms within 10 steps and training diverged (BENCHMARKS.md,
    the lr sweep). Scaling those weights' lr by 1 / G (muP's rule for Adam on a layer's output, Yang et al.
    2022) bounds the step of every emitted entry by about lr, as for a plain LoRA, whatever G, d_in or d_out.
    Nothing upstream can inflate A or B instead: u is normalised, so |B_i| <= ||W_i|| * sqrt(G) + |b_i|
    whatever the encoder and generator do; they only choose its direction. (Gradient clipping cannot help:
    Adam divides a gradient's scale out.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from common.config import HyperConfig
from stage2_student.targets import Target

def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """[length, dim] fixed sin/cos position codes (no parameters, any length)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out


class PromptEncoder(nn.Module):
    """Prompt token embeddings [N, P, E] + mask [N, P] (True = real token) -> task vector z [N, D]."""

    def __init__(self, embed_dim: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.in_norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.query = nn.Parameter(torch.randn(1, 1, dim) / math.sqrt(dim))
        self.pool = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)
        # The task vector's mean and spread over training prompts, set once by HyperNetwork.calibrate (identity
        # until then); buffers, so that checkpoints and export-lora carry them.
        self.register_buffer("z_mean", torch.zeros(dim))
        self.register_buffer("z_std", torch.ones(dim))

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.pooled(embeds, mask) - self.z_mean) / self.z_std

    def pooled(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The task vector before standardisation."""
        n, p, _ = embeds.shape
        x = self.proj(self.in_norm(embeds.float()))
        x = x + sinusoidal_positions(p, x.shape[-1], x.device)
        pad = ~mask.bool()
        x = self.encoder(x, src_key_padding_mask=pad)
        z, _ = self.pool(self.query.expand(n, -1, -1), x, x, key_padding_mask=pad, need_weights=False)
        return self.out_norm(z[:, 0])


class ChunkedHead(nn.Module):
    """h [N, T, G] -> [N, T, n_chunks, rank * chunk]: a `length`-long side of a LoRA matrix, in chunks."""

    def __init__(self, gen_dim: int, rank: int, length: int, chunk: int, init_std: float):
        super().__init__()
        self.rank, self.length = rank, length
        self.chunk = min(chunk, length)
        self.n_chunks = math.ceil(length / self.chunk)
        self.norm = nn.LayerNorm(gen_dim)
        # FiLM per chunk; random shifts make the chunks differ from the first step on.
        self.chunk_scale = nn.Parameter(torch.zeros(self.n_chunks, gen_dim))
        self.chunk_shift = nn.Parameter(torch.randn(self.n_chunks, gen_dim))
        self.out_norm = nn.LayerNorm(gen_dim, elementwise_affine=False)
        self.proj = nn.Linear(gen_dim, rank * self.chunk)
        nn.init.normal_(self.proj.weight, std=init_std / math.sqrt(gen_dim))
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.norm(h).unsqueeze(-2)  # [N, T, 1, G]
        g = F.gelu(u * (1 + self.chunk_scale) + self.chunk_shift)  # [N, T, n_chunks, G]
        return self.proj(self.out_norm(g))  # [N, T, n_chunks, rank * chunk]

    def as_a(self, h: torch.Tensor) -> torch.Tensor:
        """-> A [N, T, rank, length]: each chunk is rank rows x `chunk` columns."""
        out = self(h)
        n, t = out.shape[:2]
        out = out.view(n, t, self.n_chunks, self.rank, self.chunk).transpose(2, 3)
        return out.reshape(n, t, self.rank, self.n_chunks * self.chunk)[..., : self.length]

    def as_b(self, h: torch.Tensor) -> torch.Tensor:
        """-> B [N, T, length, rank]: each chunk is `chunk` rows x rank columns."""
        out = self(h)
        n, t = out.shape[:2]
        return out.view(n, t, self.n_chunks * self.chunk, self.rank)[:, :, : self.length]


class HyperNetwork(nn.Module):
    """Task prompt -> {target name: (A [N, r, d_in], B [N, d_out, r])}, all fp32.

    `targets` come from `resolve_targets`; `embed_dim` is the student's hidden size (its input
    embedding width); every other size comes from `hyper_cfg`. The LoRA update is
    y = W x + `lora_scale` * B (A x), lora_scale = alpha / rank. Built by `model.build_distill_model`.
    """

    def __init__(self, hyper_cfg: HyperConfig, targets: list[Target], embed_dim: int):
        super().__init__()
        if not targets:
            raise ValueError("HyperNetwork needs at least one target")
        self.targets = list(targets)
        self.rank = hyper_cfg.rank
        self.generator_dim = hyper_cfg.generator_dim
        self.lora_scale = hyper_cfg.alpha / hyper_cfg.rank
        d, g, head_chunk = hyper_cfg.encoder_dim, hyper_cfg.generator_dim, hyper_cfg.head_chunk

        self.encoder = PromptEncoder(embed_dim, d, hyper_cfg.encoder_layers, hyper_cfg.encoder_heads)
        if not hyper_cfg.train_encoder:
            self.encoder.requires_grad_(False)  # no gradient, no optimizer state; checkpoints still carry it

        kinds = sorted({t.kind for t in targets})
        self.layer_emb = nn.Embedding(max(t.layer for t in targets) + 1, d)
        self.kind_emb = nn.Embedding(len(kinds), d)
        self.generator = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, g), nn.GELU(), nn.Linear(g, g))

        # Targets grouped by shape: each group runs its heads once over all its targets.
        self.groups: dict[str, list[Target]] = {}
        for t in self.targets:
            self.groups.setdefault(t.shape_key, []).append(t)
        self.heads_a = nn.ModuleDict()
        self.heads_b = nn.ModuleDict()
        position = {t.name: i for i, t in enumerate(self.targets)}
        # Index lists stay Python (not buffers) so that a meta-device build + to_empty() loses nothing.
        self._group_rows = {key: [position[t.name] for t in group] for key, group in self.groups.items()}
        for key, group in self.groups.items():
            d_in, d_out = group[0].in_features, group[0].out_features
            self.heads_a[key] = ChunkedHead(g, self.rank, d_in, head_chunk, init_std=1.0 / math.sqrt(3 * d_in))
            self.heads_b[key] = ChunkedHead(g, self.rank, d_out, head_chunk, init_std=0.0)
        self._layer_ids = [t.layer for t in self.targets]
        self._kind_ids = [kinds.index(t.kind) for t in self.targets]

    @torch.no_grad()
    def calibrate(self, prompts: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Standardise the task vector z per feature over `prompts` ((embeds [N, P, E], mask [N, P]) batches of
        training prompts): from now on z = (pooled - mean) / std. Call once before the first step (the trainer
        does, on rank 0, then broadcasts); returns how much of z differed between the prompts before."""
        z = torch.cat([self.encoder.pooled(e, m) for e, m in prompts])  # [N, D]
        if len(z) < 2:
            raise ValueError(f"calibrate needs at least 2 prompts, got {len(z)}")
        mean, std = z.mean(0), z.std(0)
        self.encoder.z_mean.copy_(mean)
        self.encoder.z_std.copy_(std.clamp_min(1e-6))
        spread = (z - mean).norm(dim=-1).pow(2).mean().sqrt()
        return {"prompts": len(z), "varying_share": float(spread / (mean.norm().pow(2) + spread.pow(2)).sqrt())}

    def optimizer_groups(self) -> list[dict]:
        """Adam(W) parameter groups, each with an `lr_scale` for the trainer to multiply the scheduled lr by:
        the heads' output projections at 1 / generator_dim (see the module docstring), the rest at 1.

        Call it after FSDP2 has wrapped the module (it reads the parameters the optimizer must hold)."""
        projections = [head.proj.weight for heads in (self.heads_a, self.heads_b) for head in heads.values()]
        chosen = {id(p) for p in projections}
        rest = [p for p in self.parameters() if id(p) not in chosen and p.requires_grad]  # a frozen encoder: none
        return [{"params": rest, "lr_scale": 1.0}, {"params": projections, "lr_scale": 1.0 / self.generator_dim}]

    def forward(
        self, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """prompt_embeds [N, P, E] (any float dtype), prompt_mask [N, P] bool (True = real token)."""
        if prompt_embeds.dim() != 3 or prompt_mask.shape != prompt_embeds.shape[:2]:
            raise ValueError(
                f"expected prompt_embeds [N, P, E] and prompt_mask [N, P], got "
                f"{tuple(prompt_embeds.shape)} and {tuple(prompt_mask.shape)}"
            )
        if not bool(prompt_mask.any(dim=1).all()):
            raise ValueError("every sample needs at least one prompt token (a prompt_mask row is all False)")
        z = self.encoder(prompt_embeds, prompt_mask)  # [N, D]
        dev = z.device
        layer_ids = torch.tensor(self._layer_ids, device=dev)
        kind_ids = torch.tensor(self._kind_ids, device=dev)
        cond = z[:, None, :] + self.layer_emb(layer_ids) + self.kind_emb(kind_ids)  # [N, n_targets, D]
        h = self.generator(cond)  # [N, n_targets, G]

        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, group in self.groups.items():
            hg = h.index_select(1, torch.tensor(self._group_rows[key], device=dev))  # [N, T_g, G]
            a = self.heads_a[key].as_a(hg)  # [N, T_g, r, d_in]
            b = self.heads_b[key].as_b(hg)  # [N, T_g, d_out, r]
            for i, t in enumerate(group):
                # clone(): a slice is a view, and FSDP2 warns about (and would mishandle an in-place op on) a view
                # returned from a wrapped module's forward; each target's A and B get their own memory instead.
                out[t.name] = (a[:, i].clone(), b[:, i].clone())
        return out
