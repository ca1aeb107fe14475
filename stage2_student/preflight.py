"""`hyperdistill preflight`: the checks worth running before spending a node on stage 2.

1. targets      every config pattern resolves to target linears of the student
2. zero-init    with the freshly initialised hypernetwork the student's logits equal the base exactly
3. grad-flow    after one step every hypernetwork parameter gets a gradient and no student parameter does
4. cache        the cache's tokenizer and chat-template fingerprints match the student's
5. memory       the per-rank memory estimate fits the device with headroom
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
from stage2_student.hypernet import HyperNetwork
from stage2_student.lora import LoRAInjector
from stage2_student.losses import topk_distill_loss
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
    targets = resolve_targets(student, cfg.hyper.targets)
    torch.manual_seed(0)
    hyper = HyperNetwork(cfg.hyper, targets, embed_dim=student.config.hidden_size, head_chunk=cfg.hyper.head_chunk)
    injector = LoRAInjector(student, targets, scale=cfg.hyper.alpha / cfg.hyper.rank)
    vocab = student.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 48), generator=gen)
    prompt = torch.randint(0, vocab, (2, 16), generator=gen)
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)

    def lora():
        return hyper(student.get_input_embeddings()(prompt).float(), prompt_mask)

    with torch.no_grad():
        base = student(input_ids=ids).logits
        with injector.weights(lora()):
            injected = student(input_ids=ids).logits
    same = torch.equal(base, injected)
    checks.append(Check("zero-init", same, f"logits with the initial LoRA {'equal' if same else 'DIFFER from'} the base ({what})"))

    # One step on a fake top-K target so that B leaves zero, then every parameter must get a gradient.
    opt = torch.optim.AdamW(hyper.parameters(), lr=1e-3)
    k = min(cfg.cache.k, 8)
    topk_ids = torch.randint(0, vocab, (ids.shape[1] * 2, k), generator=gen)
    teacher = torch.log_softmax(torch.randn(topk_ids.shape, generator=gen), -1) - 0.1
    missing: list[str] = []
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        with injector.weights(lora()):
            hidden = student.model(input_ids=ids).last_hidden_state.reshape(-1, student.config.hidden_size)
            out = topk_distill_loss(hidden, student.lm_head.weight, topk_ids, teacher, kind=cfg.train.loss)
            out.loss.mean().backward()
        if step == 1:
            missing = [n for n, p in hyper.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
        opt.step()
    leaked = [n for n, p in student.named_parameters() if p.grad is not None]
    injector.remove()
    ok = not missing and not leaked
    detail = "every hypernetwork parameter has a gradient; the student has none"
    if missing:
        detail = f"no gradient reaches {len(missing)} hypernetwork parameters, e.g. {missing[:3]}"
    if leaked:
        detail = f"student parameters received gradients, e.g. {leaked[:3]}"
    checks.append(Check("grad-flow", ok, detail))

    checks.append(_cache_check(cfg))
    checks.append(_memory_check(cfg, n_params, sum(p.numel() for p in hyper.parameters()), world_size))
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
    from cache_schema import CacheReader
    from common.tokenizer import chat_template_fingerprint, tokenizer_fingerprint

    try:
        reader = CacheReader(cfg.cache.path)
    except UserError as e:
        return Check("cache", False, str(e))
    tok = load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    problems = []
    if reader.meta.tokenizer.fingerprint != tokenizer_fingerprint(tok):
        problems.append("tokenizer fingerprint differs")
    if reader.meta.chat_template_fingerprint != chat_template_fingerprint(tok):
        problems.append("chat template fingerprint differs")
    if problems:
        return Check("cache", False, f"{cfg.cache.path}: {'; '.join(problems)} from student {cfg.student.model}")
    return Check("cache", True, f"{cfg.cache.path}: {len(reader)} samples, fingerprints match the student")


def _memory_check(cfg: RunConfig, student_params: int, hyper_params: int, world_size: int) -> Check:
    """Per rank: student shard (bf16) + hypernetwork shard with fp32 weights, grads and AdamW moments
    + activations (checkpointed: one block's input per layer) + the loss chunk's logits."""
    config, _ = model_config(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    seq = max(p.seq_len for p in cfg.train.phases)
    h, layers = config.hidden_size, config.num_hidden_layers
    gib = 1024**3
    weights = student_params * 2 / world_size
    hyper = hyper_params * 16 / world_size
    activations = cfg.train.batch_size * seq * h * 2 * (layers + 24)  # saved block inputs + one live block
    loss = cfg.train.loss_chunk * config.vocab_size * 4 * 3
    need = weights + hyper + activations + loss
    if torch.cuda.is_available():
        have = torch.cuda.mem_get_info()[1]
        where = torch.cuda.get_device_name()
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, world_size)
        where = f"host memory / {world_size} ranks"
    ok = need <= 0.9 * have
    return Check(
        "memory",
        ok,
        f"need ~{need / gib:.1f} GiB per rank (student {weights / gib:.1f}, hypernet+AdamW {hyper / gib:.2f}, "
        f"activations {activations / gib:.1f}, loss {loss / gib:.2f}) of {have / gib:.1f} GiB ({where})"
        + ("" if ok else f": short by {(need - 0.9 * have) / gib:.1f} GiB"),
    )


def format_checks(checks: list[Check]) -> str:
    return "\n".join(f"{'PASS' if c.ok else 'FAIL':4}  {c.name:10} {c.detail}" for c in checks)
