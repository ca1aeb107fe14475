"""`hyperdistill plan --config CONFIG`: what a run costs on paper, per stage, before any GPU time is spent.

Inputs: the run config, the models' published configs (a local config.json when there is one, else the
built-in transcriptions below; no weights), the manifest when prepare-data has written it (else stated
dataset assumptions), and a hardware description. The assumptions are the constants below; the plan prints
the ones that move its numbers.

Throughput model (per GPU, bf16 dense peak P, utilisation MFU; "MFU" here counts every executed FLOP,
recomputation included):
    FLOPs per token, forward = 2 x active matmul params                       (lm_head included)
                             + 4 x L_full x H_q x d_head x c               (full attention at mean context c)
                             + 6 x L_lin x H_v x d_k x d_v                 (gated-delta-rule state work)
    c = E[T^2] / (2 E[T]) over the tokens processed (each token attends to the tokens before it).
    Stage 1 (teacher prefill): forward only; the host's share caps each engine front end (one per engine,
        one per DP rank with teacher.data_parallel_size): HOST_TOPK_TOKENS_PER_S for vLLM's public prompt
        log-probs (teacher.capture: public), HOST_CAPTURE_TOKENS_PER_S for the engine capture;
        time = max(compute, host).
    Stage 2 (frozen student, hypernetwork trained): linears x3 (forward, recompute under activation
        checkpointing, input-gradient; no weight gradients), attention x4 (its backward is two matmul
        pairs), lm_head on the cached rows only (x3), LoRA x4 (plus its weight gradient), the hypernetwork
        6 x params x prompt tokens per sample. FSDP2 all-gathers every student block twice per micro-step
        (forward, backward) whatever the batch: time = max(compute, all-gather) per micro-step (prefetch
        overlaps them).

Memory model (per GPU):
    stage 1: weights per GPU (FP8 = 1 byte, embeddings bf16): the routed experts split over the expert-parallel
        group (DP x TP GPUs with enable_expert_parallel), the rest over TP (each DP rank holds a copy) + the
        logits: public path, one prefill chunk's bf16 logits and fp32 log-softmax (max_num_batched_tokens x
        vocab x 6 B); engine capture, one row chunk's (chunk_rows x vocab x 10 B: bf16 logits, fp32 copy, the
        logsumexp's fp32 temporary; + 3 float64 [32, vocab] blocks for sampled rows' tail draws) + chunk
        activations + overhead must fit in gpu_memory_utilization x memory; the rest is KV cache (the KV heads
        split over TP only), which must hold one max_model_len sequence.
    stage 2: student bf16 / shard + two gathered blocks (current + prefetch) + the gathered root
        (embeddings + lm_head) + hypernetwork fp32 params, grads and AdamW moments / shard + checkpointed
        block inputs (B x T x hidden x 2 B per layer) + one block's activations and their gradients + the
        LoRA deltas (fp32) + one loss chunk (loss_chunk x vocab fp32 logits and their gradient) + overhead.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.errors import UserError
from common.model_configs import model_config

GB = 1e9

# ---------------------------------------------------------------------------------------------
# Stated assumptions (printed with every plan)

PEAK_TFLOPS_BF16 = 989.0
"""Dense bf16 peak of an H100/H200 SXM GPU (TFLOP/s); FP8 is twice that."""
ALLGATHER_GBPS = 350.0
"""NCCL all-gather bus bandwidth per GPU inside an NVLink node (GB/s), large messages."""
INTERNODE_GBPS = 50.0
"""Per-GPU bandwidth across nodes (400 Gb/s InfiniBand per GPU), for HSDP's cross-node reduction."""
MFU_TEACHER = 0.30
"""Assumed utilisation of vLLM's FP8 MoE prefill."""
MFU_STUDENT = 0.20
"""Assumed utilisation of transformers' Qwen3-Next forward/backward (grouped MoE GEMMs of ~T*k/E rows)."""
HOST_TOPK_TOKENS_PER_S = 34_000.0
"""Prompt-logprob conversion per engine (vLLM flat_logprobs, K=128, measured on 2 CPU cores: BENCHMARKS.md, stage 1)."""
HOST_CAPTURE_TOKENS_PER_S = 750_000.0
"""Driver-process CPU per token with the engine capture (BENCHMARKS.md, stage-1 capture: 1.18 us/token for
top-K rows, 1.33 for sampled rows, on one core of the 2-core VM), per front end."""
OVERHEAD_GB = 4.0
"""CUDA context, NCCL buffers, allocator slack per GPU."""
ASSUMED_ASSISTANT_FRACTION = 0.28
"""Without a manifest: assistant tokens / all tokens (measured on the bundled sample with prepare-data)."""
PUBLISHED_DATASETS = {
    # The dataset card on the Hugging Face Hub: 67,074 trajectories, 32,161 resolved, 64 turns on average.
    "hf://nebius/SWE-rebench-openhands-trajectories": {"all": 67_074, "resolved": 32_161},
}
SEED_PLAN_HOURS = 44.0
SEED_PLAN = "the seed's plan: ~44 h for stage 2 on 8x H200 (warmup 1k x 8k, main 20k x 20 epochs x 8k, anneal at 32k)"
ENGINE_LOAD_GBPS = 2.0
"""Reading the teacher's weights from shared storage when an engine starts (GB/s per node)."""
ENGINE_WARMUP_MIN = 2.0
"""Minutes of engine start-up beside reading weights (memory profiling, CUDA graph capture)."""
LINEAR_ATTN_FLOPS = 6
"""FLOPs per (value head x d_k x d_v) per token in a Gated DeltaNet layer (decay, update, readout, chunking)."""


# ---------------------------------------------------------------------------------------------
# Models: shapes and parameter counts from a config (meta device, no weights)


@dataclass(frozen=True)
class ModelShape:
    name: str
    source: str
    model_type: str
    params: int
    active_params: int
    """Matmul parameters per token: all, less idle routed experts and the input-embedding lookup."""
    lm_head_params: int
    expert_params: int
    """Routed experts' parameters (what expert parallelism splits)."""
    root_params: int
    """Embeddings + lm_head + final norm (FSDP2's root unit)."""
    max_block_params: int
    hidden: int
    vocab: int
    layers: int
    full_attn_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    linear_attn_layers: int
    linear_state: int
    """Sum over one DeltaNet layer's value heads of d_k x d_v (0 without linear attention)."""
    block_act_values: int
    """Activation values per token in the widest block: every projection's output width (top-k experts)."""
    config: object = field(repr=False, compare=False)

    def attention_flops(self, mean_context: float) -> float:
        return 4.0 * self.full_attn_layers * self.q_heads * self.head_dim * mean_context

    def linear_attention_flops(self) -> float:
        return LINEAR_ATTN_FLOPS * self.linear_attn_layers * self.linear_state


@functools.cache
def model_shape(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """Parameter counts and the shapes the plan needs, from the model's config on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    config, source = model_config(name, revision, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings().weight
    n_experts = getattr(config, "num_experts", 0) or 0
    top_k = getattr(config, "num_experts_per_tok", 0) or 0
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    idle = routed * (1 - top_k / n_experts) if n_experts else 0
    tied = embed is lm_head
    active = int(total - idle - (0 if tied else embed.numel()))

    blocks = list(model.model.layers)
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(blocks))
    n_linear = sum(t == "linear_attention" for t in layer_types)
    linear_state = 0
    if n_linear:
        linear_state = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
    return ModelShape(
        name=name,
        source=source,
        model_type=config.model_type,
        params=total,
        active_params=active,
        lm_head_params=lm_head.numel(),
        expert_params=routed,
        root_params=total - sum(block_sizes),
        max_block_params=max(block_sizes),
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        layers=len(blocks),
        full_attn_layers=len(blocks) - n_linear,
        q_heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        linear_attn_layers=n_linear,
        linear_state=linear_state,
        block_act_values=max(_block_act_values(b, top_k) for b in blocks),
        config=config,
    )


def _block_act_values(block, top_k: int) -> int:
    """Output widths of a block's projections per token; a routed expert counts top_k times."""
    from torch import nn

    values = 0
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            values += module.out_features
        elif isinstance(module, nn.Conv1d):
            values += module.out_channels
    for name, p in block.named_parameters():
        if ".experts." in f".{name}" and p.dim() == 3:  # [E, out, in]
            values += top_k * p.shape[1]
    return values


# ---------------------------------------------------------------------------------------------
# The data: from the manifest, or stated assumptions


@dataclass(frozen=True)
class Dataset:
    source: str
    lengths: np.ndarray  # tokens per kept sample (train split)
    assistant: np.ndarray  # assistant tokens per sample (train split)
    heldout_lengths: np.ndarray
    heldout_assistant: np.ndarray
    prompt_tokens: float  # mean per sample

    @property
    def n_train(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum() + self.heldout_lengths.sum())


def load_dataset(cfg: RunConfig) -> Dataset:
    path = Path(cfg.manifest)
    if path.is_file():
        from common.manifest import load_manifest

        rows = load_manifest(path)
        if not rows:
            raise UserError(f"manifest {path}: no samples")
        train = [r for r in rows if not r["heldout"]]
        return Dataset(
            source=f"manifest {path} ({len(rows):,} samples)",
            lengths=np.array([r["n_tokens"] for r in train], dtype=np.float64),
            assistant=np.array([r["n_assistant_tokens"] for r in train], dtype=np.float64),
            heldout_lengths=np.array([r["n_tokens"] for r in rows if r["heldout"]], dtype=np.float64),
            heldout_assistant=np.array([r["n_assistant_tokens"] for r in rows if r["heldout"]], dtype=np.float64),
            prompt_tokens=float(np.mean([r["n_prompt_tokens"] for r in rows])),
        )
    known = PUBLISHED_DATASETS.get(cfg.data.source)
    if known is None:
        raise UserError(
            f"manifest {path}: not found, and no dataset assumption for source {cfg.data.source!r}: "
            "run prepare-data first"
        )
    n = known["resolved" if cfg.data.resolved_only else "all"]
    lo, hi = max(cfg.data.min_tokens, 1), cfg.data.max_tokens
    # Lengths spread evenly over [min_tokens, max_tokens] (the quantiles of a uniform distribution).
    lengths = np.linspace(lo, hi, n)
    heldout = np.zeros(n, dtype=bool)
    heldout[:: max(1, round(1 / cfg.data.heldout_fraction))] = cfg.data.heldout_fraction > 0
    return Dataset(
        source=(
            f"assumed: {n:,} {'resolved ' if cfg.data.resolved_only else ''}trajectories of {cfg.data.source} "
            f"(dataset card), all kept, lengths uniform on [{lo:,}, {hi:,}] tokens, "
            f"{ASSUMED_ASSISTANT_FRACTION:.0%} assistant tokens, prompts of {cfg.data.max_prompt_tokens} tokens"
        ),
        lengths=lengths[~heldout],
        assistant=lengths[~heldout] * ASSUMED_ASSISTANT_FRACTION,
        heldout_lengths=lengths[heldout],
        heldout_assistant=lengths[heldout] * ASSUMED_ASSISTANT_FRACTION,
        prompt_tokens=float(cfg.data.max_prompt_tokens),
    )


def _cut(lengths: np.ndarray, seq_len: int | None) -> np.ndarray:
    return lengths if seq_len is None else np.minimum(lengths, seq_len)


def mean_context(lengths: np.ndarray) -> float:
    """Mean number of earlier tokens a token attends to, over all tokens of these sequences."""
    return float((lengths**2).sum() / (2 * lengths.sum()))


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_mem_gb: float
    gpus_per_node: int = 8
    peak_tflops: float = PEAK_TFLOPS_BF16
    allgather_gbps: float = ALLGATHER_GBPS
    internode_gbps: float = INTERNODE_GBPS
    mfu_teacher: float = MFU_TEACHER
    mfu_student: float = MFU_STUDENT
    host_topk_tokens_per_s: float = HOST_TOPK_TOKENS_PER_S
    host_capture_tokens_per_s: float = HOST_CAPTURE_TOKENS_PER_S
    overhead_gb: float = OVERHEAD_GB


@dataclass(frozen=True)
class Stage1:
    engines: int
    """Engine front ends: engines x DP ranks, over all nodes."""
    tp: int
    memory: dict[str, float]  # GB per GPU, the fixed parts
    budget_gb: float
    kv_gb: float
    kv_tokens: int
    tokens: int
    flops_per_token: float
    compute_hours: float
    host_hours: float
    rows: int
    bytes_per_row: float
    cache_gb: float
    flops_peak_fp8: bool
    start_hours: float
    """One engine start (weights read + warm-up); each job (node) pays it once."""
    dp: int = 1
    """Data-parallel ranks per engine group."""
    ep: int = 1
    """GPUs the routed experts are split over (1: no expert parallelism)."""
    capture: str = "public"
    host_tokens_per_s: float = HOST_TOPK_TOKENS_PER_S
    """What one front end's host share sustains (public conversion or engine capture)."""

    @property
    def hours(self) -> float:
        return self.start_hours + max(self.compute_hours, self.host_hours)


@dataclass(frozen=True)
class Phase:
    name: str
    samples: int
    epochs: float
    seq_len: int
    steps: int
    micro_steps: int
    passes: int
    """Sample passes actually run (the trainer drops the tail that cannot fill a global batch)."""
    tokens: int
    rows: int
    mean_context: float
    flops_per_token: float
    memory: dict[str, float]
    compute_hours: float
    comm_hours: float

    @property
    def hours(self) -> float:
        return max(self.compute_hours, self.comm_hours)

    @property
    def memory_gb(self) -> float:
        return sum(self.memory.values())


@dataclass(frozen=True)
class Stage2:
    shard: int
    replicate: int
    samples_per_step: int
    hypernet_params: int
    gather_gb_per_micro_step: float
    phases: list[Phase]
    eval_passes: int
    eval_hours: float

    @property
    def hours(self) -> float:
        return sum(p.hours for p in self.phases) + self.eval_hours


@dataclass(frozen=True)
class Plan:
    name: str
    hardware: Hardware
    teacher: ModelShape
    student: ModelShape
    data: Dataset
    stage1: Stage1
    stage2: Stage2
    compare_seed: bool
    num_shards: int

    @property
    def hours(self) -> float:
        return self.stage1.hours + self.stage2.hours


def _weight_bytes(shape: ModelShape, dtype: str, quantization: str | None) -> float:
    """Bytes of the weights. FP8: the decoder blocks' weights at 1 byte (128x128 block scales add ~0.02%),
    the embeddings, lm_head and final norm (the root) in bf16."""
    if quantization == "fp8":
        return (shape.params - shape.root_params) * 1.0 + shape.root_params * 2.0
    return shape.params * _dtype_bytes(dtype)


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2)


def _over(stage: str, parts: dict[str, float], limit: float, what: str) -> UserError:
    used = sum(parts.values())
    detail = " + ".join(f"{k} {v:.1f}" for k, v in parts.items())
    return UserError(f"{stage}: needs {used:.1f} GB per GPU ({detail}), {used - limit:.1f} GB over {what}")


def plan_stage1(
    cfg: RunConfig, hw: Hardware, teacher: ModelShape, data: Dataset, bytes_per_row: float | None
) -> Stage1:
    """Stage 1's engines, memory per GPU (refused if it does not fit), work, time and cache size."""
    t = cfg.teacher
    tp, dp = t.tensor_parallel_size, t.data_parallel_size
    per_node = min(hw.gpus, hw.gpus_per_node)
    if tp * dp * t.num_engines > per_node:
        what = f"x data_parallel_size {dp} " if dp > 1 else ""
        raise UserError(
            f"stage 1 (teacher-cache): teacher.num_engines {t.num_engines} {what}x tensor_parallel_size {tp} needs "
            f"{tp * dp * t.num_engines} GPUs on a node; the plan has {per_node}"
        )
    # One job per node (a Slurm array task), each running num_engines engines (x DP ranks) against the shared cache.
    engines = math.ceil(hw.gpus / hw.gpus_per_node) * t.num_engines * dp
    ep = tp * dp if t.enable_expert_parallel and teacher.expert_params else 1
    all_weights = _weight_bytes(teacher, t.dtype, t.quantization)
    expert_weights = all_weights * teacher.expert_params / teacher.params if teacher.expert_params else 0.0
    # Experts over the EP group (or tensor-split over TP without EP); attention, embeddings, lm_head over TP.
    weights = (expert_weights / max(ep, tp) + (all_weights - expert_weights) / tp) / GB
    capture = t.capture if t.backend == "vllm" else "public"
    if capture == "engine":  # one row chunk at a time (stage1_teacher.capture), not the whole prefill chunk
        tail_blocks = 3 * 32 * teacher.vocab * 8 / GB if cfg.cache.rows == "sampled" else 0.0  # float64 [32, V]
        logits = t.chunk_rows * teacher.vocab * 10 / GB + tail_blocks
    else:  # the prefill chunk's logits live on the engine's first rank: bf16 logits + fp32 log-softmax
        logits = t.max_num_batched_tokens * teacher.vocab * 6 / GB
    acts = t.max_num_batched_tokens * teacher.block_act_values * 2 * 2 / tp / GB
    fixed = {"weights": weights, "logits": logits, "activations": acts, "overhead": hw.overhead_gb}
    budget = t.gpu_memory_utilization * hw.gpu_mem_gb
    if sum(fixed.values()) > budget:
        what = f"teacher.gpu_memory_utilization x {hw.gpu_mem_gb:g} GB = {budget:.1f} GB"
        raise _over("stage 1 (teacher-cache)", fixed, budget, what)
    kv_heads_per_gpu = math.ceil(teacher.kv_heads / tp)
    kv_per_token = 2 * teacher.full_attn_layers * kv_heads_per_gpu * teacher.head_dim * _dtype_bytes(t.dtype)
    kv_gb = budget - sum(fixed.values())
    kv_tokens = int(kv_gb * GB / kv_per_token)
    if kv_tokens < t.max_model_len:
        short = (t.max_model_len - kv_tokens) * kv_per_token / GB
        raise UserError(
            f"stage 1 (teacher-cache): {kv_gb:.1f} GB of KV cache per GPU hold {kv_tokens:,} tokens, fewer than one "
            f"{t.max_model_len:,}-token sequence: {short:.1f} GB short"
        )
    lengths = np.concatenate([data.lengths, data.heldout_lengths])
    tokens = int(lengths.sum())
    attention = teacher.attention_flops(mean_context(lengths)) + teacher.linear_attention_flops()
    flops = 2 * teacher.active_params + attention
    peak = hw.peak_tflops * (2 if t.quantization == "fp8" else 1) * 1e12
    compute_h = tokens * flops / (engines * tp * peak * hw.mfu_teacher) / 3600
    host_rate = hw.host_capture_tokens_per_s if capture == "engine" else hw.host_topk_tokens_per_s
    host_h = tokens / (engines * host_rate) / 3600
    # positions=assistant stores a row at every t whose next token is an assistant token: one per assistant token.
    n_assistant = int(data.assistant.sum() + data.heldout_assistant.sum())
    rows = n_assistant if cfg.cache.positions == "assistant" else tokens - len(lengths)
    if bytes_per_row is None:
        from cache_schema.encoding import get_encoding

        # Uncompressed: ids uint32 + encoded log-probs, K each, and the row's position (uint32).
        bytes_per_row = cfg.cache.k * (4 + get_encoding(cfg.cache.encoding).dtype.itemsize) + 4
    # input_ids uint32 + loss_mask bool per token, prompt ids uint32.
    cache_gb = (rows * bytes_per_row + tokens * 5 + len(lengths) * data.prompt_tokens * 4) / GB
    start_h = (_weight_bytes(teacher, t.dtype, t.quantization) / GB / ENGINE_LOAD_GBPS / 60 + ENGINE_WARMUP_MIN) / 60
    return Stage1(engines, tp, fixed, budget, kv_gb, kv_tokens, tokens, flops, compute_h, host_h, rows, bytes_per_row,
                  cache_gb, t.quantization == "fp8", start_h, dp, ep, capture, host_rate)  # fmt: skip


def _lora_width(cfg: RunConfig, student: ModelShape) -> tuple[int, int]:
    """(sum over targets of r x (d_in + d_out), the largest per-layer sum of d_out + r) for the LoRA cost."""
    import torch
    from transformers import AutoModelForCausalLM

    from stage2_student.targets import resolve_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student.config)
    targets = resolve_targets(model, cfg.hyper.targets)
    per_layer: dict[int, int] = {}
    for t in targets:
        per_layer[t.layer] = per_layer.get(t.layer, 0) + t.out_features + cfg.hyper.rank
    return sum(cfg.hyper.rank * (t.in_features + t.out_features) for t in targets), max(per_layer.values())


def stage2_memory(
    cfg: RunConfig,
    student: ModelShape,
    hyper_params: int,
    shard: int,
    seq: int,
    overhead_gb: float,
    lora_block_width: int | None = None,
) -> dict[str, float]:
    """Stage 2's memory per GPU, in GB by part, at context `seq` with the student sharded over `shard` ranks
    (the module docstring's model; `preflight` checks the same figures against the device it runs on)."""
    if lora_block_width is None:
        lora_block_width = _lora_width(cfg, student)[1]
    wbytes = _dtype_bytes(cfg.student.dtype)
    b = cfg.train.batch_size
    return {
        "student shard": student.params * wbytes / shard / GB,
        "gathered blocks": 2 * student.max_block_params * wbytes / GB,
        "gathered root": student.root_params * wbytes / GB,
        "hypernetwork": hyper_params * (16 / shard + 4) / GB,
        "loss chunk": cfg.train.loss_chunk * student.vocab * 4 * 2 / GB,
        "overhead": overhead_gb,
        "saved block inputs": b * seq * student.hidden * wbytes * student.layers / GB,
        "block activations": b * seq * (student.block_act_values * wbytes * 2 + lora_block_width * 4) / GB,
    }


def plan_stage2(cfg: RunConfig, hw: Hardware, student: ModelShape, data: Dataset) -> Stage2:
    """Stage 2's mesh, per-phase steps, tokens, memory per GPU (refused if it does not fit) and time."""
    from stage2_student.param_count import count_hypernet_params

    tr = cfg.train
    world = hw.gpus
    shard = tr.shard_size or world
    if world % shard:
        raise UserError(f"stage 2 (train-student): train.shard_size {shard} does not divide {world} GPUs")
    replicate = world // shard
    hyper_params = count_hypernet_params(cfg, student.config)["params"]["total"]
    lora_flops_unit, lora_block_width = _lora_width(cfg, student)
    wbytes = _dtype_bytes(cfg.student.dtype)
    frac = (shard - 1) / shard
    # Per micro-step per GPU: blocks gathered in forward and again in backward, the root once, the
    # hypernetwork's fp32 params twice and its gradient reduce-scattered.
    gather_gb = (2 * frac * (student.params - student.root_params) * wbytes + frac * student.root_params * wbytes
                 + 3 * frac * hyper_params * 4) / GB  # fmt: skip
    cross_node_gb = 2 * (replicate - 1) / replicate * hyper_params * 4 / shard / GB
    comm_s = gather_gb / hw.allgather_gbps + cross_node_gb / hw.internode_gbps
    peak = hw.peak_tflops * 1e12 * hw.mfu_student
    b = tr.batch_size

    def train_flops(mean_ctx: float) -> float:
        linear = 2 * (student.active_params - student.lm_head_params) + student.linear_attention_flops()
        return 3 * linear + 4 * student.attention_flops(mean_ctx) + 4 * 2 * lora_flops_unit

    phases = []
    lengths, asst = data.lengths, data.assistant
    for p in tr.phases:
        chosen = data.n_train if p.samples is None else min(p.samples, data.n_train)
        passes = int(chosen * math.floor(p.epochs)) + round(chosen * (p.epochs - math.floor(p.epochs)))
        micro = passes // (b * world) // tr.grad_accum * tr.grad_accum
        steps = micro // tr.grad_accum
        used = micro * b * world
        cut = _cut(lengths, p.seq_len)
        tokens_ps = float(cut.mean())
        rows_ps = float((asst * cut / lengths).mean())
        ctx = mean_context(cut)
        per_token = train_flops(ctx) + 3 * 2 * student.lm_head_params * rows_ps / tokens_ps
        per_sample = tokens_ps * per_token + 6 * hyper_params * data.prompt_tokens
        mem = stage2_memory(cfg, student, hyper_params, shard, p.seq_len, hw.overhead_gb, lora_block_width)
        if sum(mem.values()) > hw.gpu_mem_gb:
            where = f"stage 2 (train-student), phase {p.name} at seq_len {p.seq_len}"
            raise _over(where, mem, hw.gpu_mem_gb, f"the {hw.gpu_mem_gb:g} GB of one GPU")
        compute_h = micro * b * per_sample / peak / 3600
        phases.append(
            Phase(p.name, chosen, p.epochs, p.seq_len, steps, micro, used, int(used * tokens_ps),
                  int(used * rows_ps), ctx, per_token, mem, compute_h, micro * comm_s / 3600)  # fmt: skip
        )

    # Held-out evaluation: at step 0, every eval_every steps and at the end; forward only, one gather.
    total_steps = sum(p.steps for p in phases)
    evals = 2 + max(0, (total_steps - 1) // tr.eval_every) if len(data.heldout_lengths) else 0
    eval_seq = max(p.seq_len for p in tr.phases)
    held = _cut(data.heldout_lengths, eval_seq) if len(data.heldout_lengths) else np.zeros(1)
    eval_micro = math.ceil(len(data.heldout_lengths) / (b * world))
    eval_flops = float(held.sum()) * (2 * student.active_params + student.attention_flops(mean_context(held))) / world
    eval_h = evals * max(eval_flops / peak, eval_micro * comm_s / 2) / 3600
    return Stage2(shard, replicate, b * world * tr.grad_accum, hyper_params, gather_gb, phases, evals, eval_h)


def plan_run(
    cfg: RunConfig,
    gpus: int,
    gpu_mem_gb: float,
    *,
    gpus_per_node: int = 8,
    bytes_per_row: float | None = None,
    **hardware,
) -> Plan:
    """Plan both stages of `cfg` on `gpus` GPUs of `gpu_mem_gb` each; UserError if a stage does not fit.

    `hardware` overrides Hardware's assumptions (peak_tflops, allgather_gbps, mfu_teacher, mfu_student, ...);
    `bytes_per_row` is the cache's measured bytes per top-K row (e.g. from `make bench`).
    """
    if gpus < 1 or gpu_mem_gb <= 0:
        raise UserError(f"plan: need at least one GPU with memory, got {gpus} x {gpu_mem_gb} GB")
    hw = Hardware(gpus=gpus, gpu_mem_gb=gpu_mem_gb, gpus_per_node=gpus_per_node, **hardware)
    teacher = model_shape(cfg.teacher.model, cfg.teacher.revision, cfg.teacher.trust_remote_code)
    student = model_shape(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    data = load_dataset(cfg)
    stage1 = plan_stage1(cfg, hw, teacher, data, bytes_per_row)
    stage2 = plan_stage2(cfg, hw, student, data)
    phases = [p.name for p in cfg.train.phases]
    # The seed planned this student and these phases on one node of 8 GPUs.
    seed = cfg.student.model == "Qwen/Qwen3-Coder-Next" and phases == ["warmup", "main", "anneal"] and gpus == 8
    return Plan(cfg.name, hw, teacher, student, data, stage1, stage2, seed, cfg.data.num_shards)


# ---------------------------------------------------------------------------------------------
# Printing


def _n(x: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _flop(x: float) -> str:
    """2.36e10 -> '23.6 GFLOP'."""
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}FLOP"
    return f"{x:.3g} FLOP"


def _gb(x: float) -> str:
    return f"{x:.1f} GB" if x >= 0.1 else f"{x * 1e3:.1f} MB"


def _h(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 0.1 else f"{hours * 3600:.1f} s"


def _mem(parts: dict[str, float]) -> str:
    return " + ".join(f"{k} {_gb(v)}" for k, v in parts.items()) + f" = {_gb(sum(parts.values()))}"


def format_plan(plan: Plan) -> str:
    """The plan as text: assumptions, then per stage memory, work, cache and time; totals last."""
    hw, s1, s2 = plan.hardware, plan.stage1, plan.stage2
    nodes = math.ceil(hw.gpus / hw.gpus_per_node)
    lines = [
        f"plan for {plan.name}: {hw.gpus} GPUs x {hw.gpu_mem_gb:g} GB ({nodes} node(s)), peak {hw.peak_tflops:g} "
        f"TFLOP/s bf16 per GPU (x2 for fp8); MFU counts recomputation",
    ]
    for role, m in (("teacher", plan.teacher), ("student", plan.student)):
        lines.append(
            f"{role}: {m.name} ({m.model_type}, from {m.source}): {_n(m.params)} params, {_n(m.active_params)} "
            f"active per token; {m.layers} layers, {m.full_attn_layers} with full attention"
        )
    lines += [
        f"data: {plan.data.source}",
        f"  train {plan.data.n_train:,} samples, held out {len(plan.data.heldout_lengths):,}; "
        f"{_n(plan.data.total_tokens)} tokens",
        "",
        (f"stage 1 teacher-cache: {s1.engines // s1.dp} engine group(s) x DP{s1.dp} x TP{s1.tp}"
         f"{f' + expert parallel (experts over {s1.ep} GPUs)' if s1.ep > 1 else ''} = {s1.engines * s1.tp} GPUs; "
         f"one front end per DP rank, {s1.engines} in all" if s1.dp > 1 else
         f"stage 1 teacher-cache: {s1.engines} engine(s) x TP{s1.tp}"
         f"{' + expert parallel' if plan_teacher_ep(plan) else ''} = {s1.engines * s1.tp} GPUs")
        + (f", one job per node ({nodes} nodes)" if nodes > 1 else ""),
        f"  memory per GPU: {_mem(s1.memory)} of {_gb(s1.budget_gb)} (gpu_memory_utilization); "
        f"KV cache {_gb(s1.kv_gb)} = {_n(s1.kv_tokens)} tokens",
        f"  work: {_n(s1.tokens)} tokens x {_flop(s1.flops_per_token)}/token "
        f"(2 x {_n(plan.teacher.active_params)} active + attention) = {s1.tokens * s1.flops_per_token:.3g} FLOP",
        f"  time: compute {_h(s1.compute_hours)} at MFU {hw.mfu_teacher:.0%} of the "
        f"{'fp8' if plan.stage1.flops_peak_fp8 else 'bf16'} peak; host "
        f"{'(engine capture)' if s1.capture == 'engine' else 'top-K conversion (public prompt log-probs)'} "
        f"{_h(s1.host_hours)} at {_n(s1.host_tokens_per_s)} tokens/s per {'DP rank' if s1.dp > 1 else 'engine'}; "
        f"+ engine start {_h(s1.start_hours)} -> {_h(s1.hours)}",
        f"  note: one job per part (a Slurm array task per shard) starts the engine {plan.num_shards} times: "
        f"+{_h((plan.num_shards - nodes) * s1.start_hours / nodes)}; one job per node over all parts starts it once",
        f"  cache on disk: {_n(s1.rows)} rows x {s1.bytes_per_row:.0f} B + token arrays = {_gb(s1.cache_gb)}",
        "",
        f"stage 2 train-student: FSDP2, {s2.shard} shard x {s2.replicate} replicate"
        f"{' (HSDP)' if s2.replicate > 1 else ''}; "
        f"{s2.samples_per_step} samples per optimizer step; hypernetwork {_n(s2.hypernet_params)} params",
        f"  all-gather per micro-step per GPU {_gb(s2.gather_gb_per_micro_step)} at {hw.allgather_gbps:g} GB/s; "
        f"compute at MFU {hw.mfu_student:.0%}",
        f"  {'phase':<8} {'samples x epochs':>17} {'seq':>6} {'steps':>6} {'tokens':>7} {'per token':>11} "
        f"{'GB/GPU':>7} {'compute':>9} {'gather':>9} {'time':>9}",
    ]
    for p in s2.phases:
        lines.append(
            f"  {p.name:<8} {f'{p.samples:,} x {p.epochs:g}':>17} {p.seq_len:>6} {p.steps:>6} {_n(p.tokens):>7} "
            f"{_flop(p.flops_per_token):>11} {p.memory_gb:>7.1f} {_h(p.compute_hours):>9} {_h(p.comm_hours):>9} "
            f"{_h(p.hours):>9}"
        )
    widest = max(s2.phases, key=lambda p: p.memory_gb)
    lines += [
        f"  held-out evaluation: {s2.eval_passes} passes, {_h(s2.eval_hours)}",
        f"  memory per GPU ({widest.name}): {_mem(widest.memory)}",
        "",
        f"total: stage 1 {_h(s1.hours)} + stage 2 {_h(s2.hours)} = {_h(plan.hours)} on {hw.gpus} GPUs",
    ]
    if plan.compare_seed:
        lines += ["", *seed_comparison(plan)]
    return "\n".join(lines)


def plan_teacher_ep(plan: Plan) -> bool:
    return plan.stage1.tp > 1 and plan.teacher.model_type.endswith("moe")


def seed_comparison(plan: Plan) -> list[str]:
    """Where this plan and the seed's 44 h differ, and what the seed's number implies under this model."""
    s2, hw = plan.stage2, plan.hardware
    train_h = sum(p.hours for p in s2.phases)
    flops = sum(p.tokens * p.flops_per_token for p in s2.phases)
    micro = sum(p.micro_steps for p in s2.phases)
    tokens = sum(p.tokens for p in s2.phases)
    seconds = SEED_PLAN_HOURS * 3600
    implied_mfu = flops / (seconds * hw.gpus * hw.peak_tflops * 1e12)
    implied_gbps = micro * s2.gather_gb_per_micro_step / seconds
    main = max(s2.phases, key=lambda p: p.tokens)
    return [
        f"check against {SEED_PLAN}",
        f"  this plan: {train_h:.1f} h of training (+ {s2.eval_hours:.1f} h evaluation), "
        f"{SEED_PLAN_HOURS / train_h:.1f}x less; phase {main.name}: {main.passes:,} sample passes x "
        f"{main.tokens / main.passes:,.0f} tokens (samples shorter than {main.seq_len} count their length)",
        f"  44 h means {tokens / seconds / hw.gpus:,.0f} tokens/s per GPU: under this FLOP count an MFU of "
        f"{implied_mfu:.1%} (assumed {hw.mfu_student:.0%}), or all-gathers at {implied_gbps:.0f} GB/s "
        f"(assumed {hw.allgather_gbps:g})",
    ]
