"""One typed config tree per run: defaults < YAML file < `--set key=value` overrides.

Every field carries a one-line docstring (the string literal after it) that `hyperdistill config --help`
style tooling can show; `load_config` validates the whole tree and every run writes the resolved
config next to its output (`save_resolved`).

Every numeric field's range is declared in its section's `RANGES` (">= 1", "> 0", or an interval such as
"[0, 1)"; None, where a field allows it, is always accepted) and checked on load, one line naming the field.
A numeric field without a declared range fails tests/unit/test_configs.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from common.errors import UserError


@dataclass
class DataConfig:
    RANGES: ClassVar[dict[str, str]] = {
        "min_tokens": ">= 0", "max_tokens": ">= 1", "max_prompt_tokens": ">= 1", "num_shards": ">= 1",
        "heldout_fraction": "[0, 1)",
    }  # allowed values of the numeric fields, checked on load
    source: str = "sample"
    """'sample' (bundled data/), a local .jsonl/.json/.parquet file, a folder of them or of SWE-agent .traj files, or 'hf://OWNER/NAME' (a hub dataset, streamed)."""
    split: str = "train"
    """Split to read when the source is a hub dataset."""
    resolved_only: bool | Literal["auto"] = "auto"
    """Keep only resolved trajectories: true, false, or 'auto' (filter rows that carry a resolution, keep those that carry none)."""
    results_file: str | None = None
    """SWE-bench evaluation report (JSON with 'resolved_ids') giving .traj sources their resolution; without it they have none."""
    min_tokens: int = 0
    """Drop rendered trajectories shorter than this many tokens."""
    max_tokens: int = 8192
    """Trajectories longer than this are handled as `overlong` says."""
    overlong: Literal["skip", "truncate"] = "skip"
    """What to do with a trajectory longer than max_tokens: drop it (counted) or cut it."""
    exclude_instances: list[str] = field(default_factory=list)
    """Instance ids (e.g. SWE-bench test instances) never to train on."""
    prompt: Literal["first_user", "system_and_first_user", "repository"] = "first_user"
    """Which text the hypernetwork reads as the task prompt; `repository`: "Repository: owner/name" alone, from the
    SWE-bench-style instance id (when the repository, not the issue, decides the behaviour to learn)."""
    max_prompt_tokens: int = 512
    """Task prompts are cut to this many tokens."""
    num_shards: int = 4
    """Number of cache parts; a trajectory's shard is a stable hash of its id."""
    heldout_fraction: float = 0.125
    """Fraction of trajectories (by stable hash) kept out of training for evaluation."""


@dataclass
class TeacherConfig:
    RANGES: ClassVar[dict[str, str]] = {
        "tensor_parallel_size": ">= 1", "num_engines": ">= 1", "max_model_len": ">= 2",
        "gpu_memory_utilization": "(0, 1]", "kv_cache_gib": "> 0", "max_num_batched_tokens": ">= 1",
        "batch_tokens": ">= 1", "chunk_rows": ">= 1", "data_parallel_size": ">= 1",
    }  # allowed values of the numeric fields, checked on load
    model: str = "tiny-teacher"
    """'tiny-teacher' (built locally) or a hub id / local path of a causal LM."""
    revision: str | None = None
    """Hub revision (commit or tag) to pin."""
    backend: Literal["vllm", "hf"] = "vllm"
    """'vllm' (production) or 'hf' (plain transformers forward, the reference)."""
    capture: Literal["engine", "public"] = "engine"
    """vllm: compute the rows inside vLLM's workers (exact sampled rows) or read its public prompt log-probs."""
    dtype: str = "bfloat16"
    """Weight/compute dtype of the teacher engine."""
    quantization: str | None = None
    """vLLM quantization method, e.g. 'fp8' for Qwen3-Coder-480B-A35B-Instruct-FP8."""
    tensor_parallel_size: int = 1
    """GPUs per engine (tensor parallel)."""
    enable_expert_parallel: bool = False
    """Shard MoE experts across the engine's GPUs instead of tensor-splitting them."""
    num_engines: int = 1
    """Engines run side by side on one node (one per GPU group); shards are handed out dynamically."""
    data_parallel_size: int = 1
    """vLLM data parallel ranks (one engine per rank, stepping together; with enable_expert_parallel: DP+EP)."""
    max_model_len: int = 8192
    """Longest sequence the engine accepts; longer trajectories follow data.overlong."""
    gpu_memory_utilization: float = 0.5
    """Fraction of device (or, on CPU, NUMA-node) memory vLLM may reserve."""
    kv_cache_gib: float | None = None
    """KV cache size in GiB; overrides gpu_memory_utilization's sizing (handy on CPU). None = automatic."""
    max_num_batched_tokens: int = 8192
    """Tokens per engine step; prompt log-probs cost ~vocab*4 bytes per token of this."""
    batch_tokens: int = 16384
    """Tokens submitted to the engine per call (several samples)."""
    enforce_eager: bool = True
    """Skip graph capture / compilation (recommended on CPU)."""
    batch_invariant: bool = False
    """vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1): rows bitwise independent of batching; GPU only."""
    trust_remote_code: bool = False
    """Allow model repos to run their own Python code. Off unless a model needs it."""
    chunk_rows: int = 256
    """hf backend and vLLM engine capture: rows per lm_head + logsumexp + top-K chunk."""


@dataclass
class StudentConfig:
    model: str = "tiny-student"
    """'tiny-student' (built locally) or a hub id / local path; its tokenizer and chat template render the data."""
    revision: str | None = None
    """Hub revision to pin."""
    dtype: str = "bfloat16"
    """Dtype of the frozen student's weights."""
    trust_remote_code: bool = False
    """Allow model repos to run their own Python code."""


@dataclass
class CacheConfig:
    RANGES: ClassVar[dict[str, str]] = {
        "k": ">= 1", "mass_epsilon": "(0, 1)", "draws": "[1, 1024]", "sample_seed": ">= 0",
    }  # allowed values of the numeric fields, checked on load
    path: str = "runs/demo/cache.zarr"
    """Where the Zarr store lives: a local path or an fsspec URL (s3://, gs://)."""
    k: int = 128
    """Top-K log-probs stored per row."""
    encoding: str = "fp16"
    """How log-probs are encoded (see cache_schema.encoding)."""
    positions: Literal["assistant", "all"] = "assistant"
    """Store rows only where the next token is an assistant token, or everywhere."""
    mass_epsilon: float | None = None
    """Mass-adaptive K: keep per row the fewest top entries covering 1 - epsilon of the probability (<= k)."""
    rows: Literal["topk", "sampled"] = "topk"
    """Rows hold the teacher's top-K, or N draws from its distribution (RS-KD; unbiased except with capture=public)."""
    draws: int = 64
    """Sampled rows: draws N per row, at most 1024 (the row width stage 2 sees)."""
    sample_seed: int = 0
    """Sampled rows: seed of the draws (per sample, so runs repeat exactly)."""


@dataclass
class HyperConfig:
    RANGES: ClassVar[dict[str, str]] = {
        "rank": ">= 1", "alpha": "> 0", "encoder_dim": ">= 1", "encoder_layers": ">= 1", "encoder_heads": ">= 1",
        "generator_dim": ">= 1", "head_chunk": ">= 1", "calibration_prompts": ">= 0",
    }  # allowed values of the numeric fields, checked on load
    targets: list[str] = field(
        default_factory=lambda: [
            r"self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
            r"linear_attn\.(in_proj_qkvz|in_proj_ba|out_proj)$",
        ]
    )
    """Regexes over student module names; each must match at least one nn.Linear."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    encoder_dim: int = 256
    """Width of the prompt encoder and of the task vector z."""
    encoder_layers: int = 2
    """Transformer layers in the prompt encoder."""
    encoder_heads: int = 4
    """Attention heads in the prompt encoder."""
    generator_dim: int = 512
    """Hidden width of the shared generator MLP."""
    head_chunk: int = 256
    """A and B are emitted in chunks of this many columns/rows by heads shared across chunks."""
    calibration_prompts: int = 256
    """Training prompts over which the task vector is standardised before the first step (0: not at all)."""
    train_encoder: bool = False
    """Train the prompt encoder with the rest of the hypernetwork. Off by default: the encoder stays as initialised
    (a fixed random map of the prompt, standardised by the calibration) and only the generator, the layer and kind
    embeddings and the heads train; a trained encoder learned to give every prompt the same task vector
    (stage2_student/hypernet.py)."""
    mode: Literal["hypernetwork", "static"] = "hypernetwork"
    """'hypernetwork': a LoRA per task prompt; 'static': one trainable LoRA shared by every sample (the baseline)."""


@dataclass
class PhaseConfig:
    RANGES: ClassVar[dict[str, str]] = {
        "samples": ">= 1", "epochs": "> 0", "seq_len": ">= 2", "lr": "> 0",
    }  # allowed values of the numeric fields, checked on load
    name: str = "main"
    """Phase name, shown in logs."""
    samples: int | None = None
    """Cap on distinct training samples used in this phase (None = all)."""
    epochs: float = 1.0
    """Passes over the phase's samples."""
    seq_len: int = 8192
    """Context length: longer samples are cut to this."""
    lr: float | None = None
    """Peak learning rate for this phase (None = train.lr)."""


@dataclass
class TrainConfig:
    RANGES: ClassVar[dict[str, str]] = {
        "batch_size": ">= 1", "grad_accum": ">= 1", "lr": "> 0", "weight_decay": ">= 0", "warmup_steps": ">= 0",
        "min_lr_ratio": "[0, 1]", "grad_clip": "> 0", "temperature": "> 0", "loss_chunk": ">= 1",
        "checkpoint_every": ">= 1", "eval_every": ">= 1", "log_every": ">= 1", "seed": ">= 0", "num_workers": ">= 0",
        "max_steps": ">= 1", "shard_size": ">= 1",
    }  # allowed values of the numeric fields, checked on load
    output_dir: str = "runs/demo/student"
    """Checkpoints, TensorBoard logs and the resolved config go here."""
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    """Training phases run in order (e.g. warmup, main, context annealing)."""
    batch_size: int = 2
    """Samples per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Clip the hypernetwork's gradient norm to this."""
    loss: Literal["forward_tail", "forward_renorm", "reverse_tail"] = "forward_tail"
    """KL variant: forward KL with a tail bucket (default), renormalised top-K, or reverse KL with tail."""
    temperature: float = 1.0
    """Softmax temperature applied to both distributions."""
    loss_chunk: int = 1024
    """Sequence chunk for lm_head + logsumexp + gather."""
    activation_checkpointing: bool = True
    """Recompute student blocks in backward."""
    checkpoint_every: int = 50
    """Save a DCP checkpoint every N optimizer steps."""
    eval_every: int = 25
    """Held-out evaluation every N optimizer steps."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    seed: int = 0
    """Seed for the hypernetwork init, data order and sampling."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    max_steps: int | None = None
    """Stop after this many optimizer steps overall (None = run all phases)."""
    shard_size: int | None = None
    """FSDP shard group size, e.g. GPUs per node; groups replicate across nodes (HSDP). None = all ranks."""
    online_teacher: bool = False
    """Distil online from teacher.model loaded in stage 2 (full-vocab KL, small teachers); the cache gives the rows."""
    eval_teacher: bool = False
    """Also report held-out full-vocabulary KL to teacher.model loaded in stage 2 (small teachers only)."""


@dataclass
class RunConfig:
    name: str = "demo"
    """Run name, used in logs and metadata."""
    data: DataConfig = field(default_factory=DataConfig)
    """Which trajectories, filtered and sharded how."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Stage 1: the teacher and its engine."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """Stage 2: the frozen student (its tokenizer also renders the data)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The logit cache between the stages."""
    hyper: HyperConfig = field(default_factory=HyperConfig)
    """The hypernetwork that writes LoRA weights."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Stage 2 optimisation."""
    manifest: str = "runs/demo/manifest.jsonl"
    """Output of prepare-data: one line per kept trajectory (id, lengths, shard)."""


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML value into the annotated type, recursing into dataclasses and lists."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config field '{where}': expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[1:]:  # e.g. bool | Literal['auto']: the first type that takes the value
            try:
                return _coerce(value, alternative, where)
            except UserError:
                pass
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise UserError(f"config field '{where}': {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config field '{where}': expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads '3e-4' (no dot) as a string
            return float(value)
        except ValueError:
            raise UserError(f"config field '{where}': expected a number, got {value!r}") from None
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"config field '{where}': expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(f"config: unknown field(s) {', '.join(prefix + u for u in unknown)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: '{p}' is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults < YAML file < overrides, validated."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p}: not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {p}: top level must be a mapping")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
    cfg = _build(RunConfig, raw)
    validate(cfg)
    return cfg


def config_from_dict(raw: dict) -> RunConfig:
    """Rebuild a RunConfig from `to_dict` output (e.g. the copy saved in a checkpoint or a cache)."""
    cfg = _build(RunConfig, raw)
    validate(cfg)
    return cfg


def numeric_fields(cls: type) -> list[str]:
    """Names of a config section's int and float fields (optional ones included, bools not)."""
    hints = typing.get_type_hints(cls)
    numeric = []
    for f in dataclasses.fields(cls):
        types = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
        if types and all(t in (int, float) for t in types):
            numeric.append(f.name)
    return numeric


def in_range(value: float, spec: str) -> bool:
    """Whether `value` lies in a RANGES spec: ">= a", "> a", or an interval "[a, b]" / "(a, b)" / mixed."""
    spec = spec.strip()
    if spec[:1] in "([" and spec[-1:] in ")]":
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)
    op, bound = spec.split()
    if op not in (">=", ">"):
        raise ValueError(f"range spec {spec!r}: expected '>= a', '> a' or an interval")
    return value >= float(bound) if op == ">=" else value > float(bound)


def check_ranges(node: Any, where: str = "") -> None:
    """Every numeric field of the config tree under `node` within its section's RANGES (UserError naming it)."""
    for name in numeric_fields(type(node)):
        value, spec = getattr(node, name), getattr(type(node), "RANGES", {}).get(name)
        path = f"{where}.{name}" if where else name
        if value is None or spec is None:  # an undeclared range fails the tests, not the run
            continue
        if not math.isfinite(value) or not in_range(value, spec):
            allowed = f"in {spec}" if spec[0] in "([" else spec
            raise UserError(f"config field '{path}': {value!r} is out of range: must be {allowed}")
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        path = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, path)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_ranges(item, f"{path}[{i}]")


def validate(cfg: RunConfig) -> None:
    """Every numeric field's range (`check_ranges`), then cross-field checks; raise UserError naming the field."""
    check_ranges(cfg)
    checks = [
        (cfg.cache.rows != "sampled" or cfg.cache.mass_epsilon is None,
         "cache.rows=sampled and cache.mass_epsilon do not combine (sampled rows keep every drawn id)"),
        (cfg.cache.rows != "sampled" or cfg.cache.encoding == "fp16",
         "cache.encoding does not apply to sampled rows (they store draw counts): leave it at fp16"),
        (cfg.data.max_tokens > cfg.data.min_tokens, "data.max_tokens must exceed data.min_tokens"),
        (
            cfg.data.max_tokens <= cfg.teacher.max_model_len,
            "data.max_tokens exceeds teacher.max_model_len: the engine would refuse those trajectories",
        ),
        (cfg.teacher.data_parallel_size == 1 or cfg.teacher.backend == "vllm",
         "teacher.data_parallel_size > 1 needs teacher.backend=vllm"),
        (cfg.teacher.data_parallel_size == 1 or cfg.teacher.num_engines == 1,
         "teacher.data_parallel_size and teacher.num_engines do not combine: DP ranks are the engines"),
        (len(cfg.hyper.targets) >= 1, "hyper.targets must name at least one pattern"),
        (len(cfg.train.phases) >= 1, "train.phases must list at least one phase"),
        (
            not cfg.train.online_teacher or cfg.train.loss == "forward_tail",
            "train.online_teacher trains forward KL over the full vocabulary: set train.loss=forward_tail "
            "(its top-K form)",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"config: {msg}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: RunConfig | dict) -> str:
    """Short stable hash of a resolved run config, or of its `to_dict` form (key order does not matter).
    Checkpoints and cache parts record it: its output must never change."""
    import hashlib

    d = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_resolved(cfg: RunConfig, directory: str | Path) -> Path:
    """Write the resolved config as YAML next to a run's output."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / "resolved_config.yaml"
    out.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its one-line docstring, read from the source (for --help and tests)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[attr-defined]
    return docs
