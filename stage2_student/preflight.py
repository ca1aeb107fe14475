"""`hyperdistill preflight`: the checks worth running before spending a node on stage 2.

1. targets      every config pattern resolves to target linears of the student
2. zero-init    with the freshly initialised hypernetwork the student's logits equal the base exactly
3. grad-flow    after one step every hypernetwork parameter gets a gradient and no student parameter does
4. cache        the trainer's cache checks: fingerprints, K and row kind against this config and student
5. memory       the per-rank memory estimate (hyperdistill plan's stage-2 model) fits the device with headroom
6. kernels      on a CUDA machine, the student's Gated DeltaNet layers have their fast kernels
                (flash-linear-attention, causal-conv1d); CPU machines run the reference code and pass

Checks 2-3 run on the configured student itself when it is small enough to load here, otherwise on a
copy of its architecture cut to one period of its layer pattern (all layer kinds, real attention and
DeltaNet widths, 8 routed experts, random weights): the code paths are the same and nothing big is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.config import RunConfig
from common.errors import UserError
from common.model_configs import model_config
from common.models import load_causal_lm, load_tokenizer
from stage2_student.checks import check_cache
from stage2_student.data import Batch
from stage2_student.model import build_distill_model
from stage2_student.targets import resolve_targets

LOADABLE_PARAMS = 2e9  # above this the structural checks use a one-period copy of the architecture


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _student_for_checks(cfg: RunConfig):
    from transformers import AutoModelForCausalLM

    config, _ = model_config(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.student.trust_remote_code)
    n_params = sum(p.numel() for p in full.parameters())
    full_targets = resolve_targets(full, cfg.hyper.targets)
    if n_params <= LOADABLE_PARAMS:
        student = load_causal_lm(cfg.student.model, "float32", cfg.student.revision, cfg.student.trust_remote_code)
        return student, full_targets, n_params, "the configured student"
    layer_types = getattr(config, "layer_types", None)
    period = (layer_types.index("full_attention") + 1) if layer_types and "full_attention" in layer_types else 1
    config.num_hidden_layers = period
    if layer_types:
        config.layer_types = layer_types[:period]
    # Neither the vocabulary nor the number of routed experts changes the code path the checks exercise.
    config.vocab_size = min(config.vocab_size, 4096)
    if getattr(config, "num_experts", 0):
        config.num_experts, config.num_experts_per_tok = min(config.num_experts, 8), min(config.num_experts_per_tok, 2)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.student.trust_remote_code).float()
    return student, full_targets, n_params, f"a {period}-layer copy of the student's architecture"


def run_preflight(cfg: RunConfig, world_size: int = 8) -> list[Check]:
    checks: list[Check] = []
    student, full_targets, n_params, what = _student_for_checks(cfg)
    kinds = sorted({t.kind for t in full_targets})
    checks.append(Check("targets", True, f"{len(full_targets)} target linears of kinds {', '.join(kinds)}"))

    student.requires_grad_(False).eval()
    torch.manual_seed(0)
    model = build_distill_model(cfg, student)  # the trainer's model, on the check student
    vocab = student.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 48), generator=gen)
    prompt = torch.randint(0, vocab, (2, 16), generator=gen)
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)

    with torch.no_grad():
        base = student(input_ids=ids).logits
        with model.lora_scope():
            model.injector.set(model.lora_weights(prompt, prompt_mask))
            injected = student(input_ids=ids).logits
    same = torch.equal(base, injected)
    checks.append(Check("zero-init", same, f"logits with the initial LoRA {'equal' if same else 'DIFFER from'} the base ({what})"))

    # Two steps of the trainer's forward on a fake top-K target at every position, so that B leaves zero;
    # then every trainable parameter must get a gradient.
    opt = torch.optim.AdamW(model.hypernet.parameters(), lr=1e-3)
    k = min(cfg.cache.k, 8)
    rows = ids.numel()
    topk_ids = torch.randint(0, vocab, (rows, k), generator=gen)
    batch = Batch(
        input_ids=ids, attention_mask=torch.ones_like(ids), prompt_ids=prompt, prompt_mask=prompt_mask,
        row_sample=torch.arange(2).repeat_interleave(ids.shape[1]), row_position=torch.arange(ids.shape[1]).repeat(2),
        topk_ids=topk_ids, topk_logprobs=torch.log_softmax(torch.randn(topk_ids.shape, generator=gen), -1) - 0.1,
        n_tokens=rows,
    )  # fmt: skip
    missing: list[str] = []
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        with model.lora_scope():
            model(batch, kind=cfg.train.loss).loss.mean().backward()
        if step == 1:
            missing = [n for n, p in model.hypernet.named_parameters()
                       if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]  # fmt: skip
        opt.step()
    frozen = [(f"hypernet.{n}", p) for n, p in model.hypernet.named_parameters() if not p.requires_grad]
    leaked = [n for n, p in [*student.named_parameters(), *frozen] if p.grad is not None]
    model.injector.remove()
    ok = not missing and not leaked
    detail = "every trainable hypernetwork parameter has a gradient; the student (and a frozen encoder) has none"
    if missing:
        detail = f"no gradient reaches {len(missing)} trainable hypernetwork parameters, e.g. {missing[:3]}"
    if leaked:
        detail = f"frozen parameters received gradients, e.g. {leaked[:3]}"
    checks.append(Check("grad-flow", ok, detail))

    checks.append(_cache_check(cfg))
    checks.append(_memory_check(cfg, world_size))
    checks.append(_kernels_check(cfg))
    return checks


def _kernels_check(cfg: RunConfig) -> Check:
    from stage2_student.kernels import fast_kernels_installed, fast_path_problem

    config, _ = model_config(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    layer_types = list(getattr(config, "layer_types", None) or [])
    installed = fast_kernels_installed()
    cuda = torch.cuda.is_available()
    problem = fast_path_problem(cuda, layer_types, installed)
    have = ", ".join(f"{dist} {'installed' if ok else 'absent'}" for dist, ok in installed.items())
    where = "CUDA" if cuda else "no CUDA: the reference PyTorch code is the path"
    return Check("kernels", problem is None, problem or f"{have} ({where})")


def _cache_check(cfg: RunConfig) -> Check:
    """The trainer's own checks of the cache against this config and student (checks.check_cache)."""
    from cache_schema import CacheReader

    try:
        reader = CacheReader(cfg.cache.path)
        tokenizer = load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
        check_cache(reader, cfg, tokenizer)
    except UserError as e:
        return Check("cache", False, str(e))
    return Check("cache", True, f"{cfg.cache.path}: {len(reader)} samples, fingerprints match the student")


def _memory_check(cfg: RunConfig, world_size: int) -> Check:
    """hyperdistill plan's stage-2 memory model (plan.stage2_memory) against the memory of this machine's
    device: its GPU, or on CPU the host memory divided among the ranks."""
    from hyperdistill.plan import GB, OVERHEAD_GB, model_shape, stage2_memory
    from stage2_student.param_count import count_hypernet_params

    shape = model_shape(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    hyper_params = count_hypernet_params(cfg, shape.config)["params"]["total"]
    shard = cfg.train.shard_size if cfg.train.shard_size and world_size % cfg.train.shard_size == 0 else world_size
    seq = max(p.seq_len for p in cfg.train.phases)
    cuda = torch.cuda.is_available()
    # OVERHEAD_GB is the CUDA context, NCCL buffers and allocator slack: nothing of it on CPU.
    parts = stage2_memory(cfg, shape, hyper_params, shard, seq, OVERHEAD_GB if cuda else 0.0)
    need = sum(parts.values()) * GB
    if cuda:
        have = torch.cuda.mem_get_info()[1]
        where = torch.cuda.get_device_name()
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, world_size)
        where = f"host memory / {world_size} ranks"
    ok = need <= 0.9 * have
    shown = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v >= 0.005)
    return Check(
        "memory",
        ok,
        f"need ~{need / GB:.1f} GB per rank ({shown}) of {have / GB:.1f} GB ({where})"
        + ("" if ok else f": short by {(need - 0.9 * have) / GB:.1f} GB"),
    )


def format_checks(checks: list[Check]) -> str:
    return "\n".join(f"{'PASS' if c.ok else 'FAIL':4}  {c.name:10} {c.detail}" for c in checks)
