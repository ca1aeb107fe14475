"""export-lora: a DCP checkpoint of the hypernetwork -> PEFT adapters that reproduce the in-training student.

A random tiny student (the tiny-student architecture, float32) is saved with the real tokenizer; a small
hypernetwork with non-zero B heads is checkpointed through stage2_student.checkpoint.save exactly as the
trainer does (single process). The exported adapter, loaded by peft onto a fresh copy of the student,
must give the logits of the trainer's own per-sample injection (LoRAInjector) for that prompt.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from common.config import HyperConfig, RunConfig, config_hash, to_dict
from common.errors import UserError
from stage2_student import checkpoint
from stage2_student.export import (
    VLLM_LORA_MODULES,
    export_lora,
    read_prompts_jsonl,
    resolve_checkpoint,
    servable_targets,
)
from stage2_student.hypernet import HyperNetwork
from hyperdistill.cli import export_lora_cmd
from stage2_student.lora import LoRAInjector
from stage2_student.targets import Target, resolve_targets

PROMPT = "Fix the off-by-one error in utils.paginate so that the last page is returned."
OTHER_PROMPT = "Add a --verbose flag to the CLI and log every HTTP request."
INPUT = "def paginate(items, size):\n    return [items[i : i + size] for i in range(0, len(items), size)]\n"


def _save_student(folder, tokenizer, **overrides):
    from transformers import AutoModelForCausalLM

    from common.tiny_models import student_config

    cfg = student_config()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _load_student(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _run_config(student_dir: str) -> RunConfig:
    cfg = RunConfig()
    cfg.student.model = student_dir
    cfg.student.dtype = "float32"
    cfg.hyper = HyperConfig(rank=4, alpha=8.0, encoder_dim=32, encoder_layers=1, encoder_heads=2, generator_dim=64)
    cfg.data.max_prompt_tokens = 48
    return cfg


def _save_checkpoint(root, cfg: RunConfig, hypernet: HyperNetwork, student_path: str, step: int = 7):
    """As the trainer saves: DCP shards of hypernet/optimizer/loop/rng, then config.json."""
    from common.models import resolve_model

    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=1e-3)
    where = checkpoint.step_dir(root, step)
    meta = {"hash": config_hash(cfg), "config": to_dict(cfg), "student": str(resolve_model(student_path))}
    loop = {"step": step, "phase": 0, "phase_step": step}
    checkpoint.save(where, hypernet, optimizer, loop, meta, is_main=True, barrier=lambda: None)
    return where


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, qwen_tokenizer):
    return _save_student(tmp_path_factory.mktemp("student"), qwen_tokenizer)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, student_dir):
    """(config, student, targets, hypernetwork with non-zero B, run output_dir holding its checkpoint)."""
    cfg = _run_config(student_dir)
    student = _load_student(student_dir)
    targets = resolve_targets(student, cfg.hyper.targets)
    torch.manual_seed(1)
    hypernet = HyperNetwork(cfg.hyper, targets, embed_dim=student.config.hidden_size)
    with torch.no_grad():  # B heads start at zero (adapter = no-op); training would have moved them
        for head in hypernet.heads_b.values():
            head.proj.weight.normal_(std=0.3)
            head.proj.bias.normal_(std=0.3)
        hypernet.encoder.z_mean.normal_(std=0.5)  # a calibrated task vector: export must carry it too
        hypernet.encoder.z_std.uniform_(0.5, 2.0)
    hypernet.eval()
    root = tmp_path_factory.mktemp("run")
    _save_checkpoint(root, cfg, hypernet, student_dir)
    return cfg, student, targets, hypernet, root


def _in_training_logits(cfg, student, targets, hypernet, tokenizer, prompt: str, input_ids: torch.Tensor):
    """The trainer's path: prompt -> student's embeddings -> hypernetwork -> LoRAInjector on the student."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][: cfg.data.max_prompt_tokens]
    prompt_ids = torch.tensor([ids])
    injector = LoRAInjector(student, targets, scale=cfg.hyper.alpha / cfg.hyper.rank)
    try:
        with torch.no_grad():
            embeds = student.get_input_embeddings()(prompt_ids).float()
            lora = hypernet(embeds, torch.ones_like(prompt_ids, dtype=torch.bool))
            with injector.weights(lora):
                return student(input_ids=input_ids).logits, lora
    finally:
        injector.remove()


def test_peft_adapter_reproduces_the_in_training_injection(trained, tmp_path, qwen_tokenizer):
    from peft import PeftModel

    cfg, student, targets, hypernet, root = trained
    (folder,) = export_lora(root, [("paginate", PROMPT)], tmp_path)
    assert folder == tmp_path / "paginate"

    input_ids = torch.tensor([qwen_tokenizer(INPUT, add_special_tokens=False)["input_ids"]])
    expected, _ = _in_training_logits(cfg, student, targets, hypernet, qwen_tokenizer, PROMPT, input_ids)
    with torch.no_grad():
        base = student(input_ids=input_ids).logits
    peft_model = PeftModel.from_pretrained(_load_student(cfg.student.model), str(folder)).eval()
    with torch.no_grad():
        got = peft_model(input_ids=input_ids).logits

    assert (expected - base).abs().max() > 1e-2  # the adapter really changes the student
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    # Every target carries a LoRA in PEFT's layout, and nothing else does.
    suffix = ".lora_A.default"
    wrapped = {name.removesuffix(suffix) for name, _ in peft_model.named_modules() if name.endswith(suffix)}
    assert {f"base_model.model.{t.name}" for t in targets} == wrapped


def test_adapter_files_follow_peft_layout(trained, tmp_path):
    cfg, _, targets, _, root = trained
    (folder,) = export_lora(root, [("t", PROMPT)], tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == cfg.hyper.rank and config["lora_alpha"] == cfg.hyper.alpha
    assert config["lora_dropout"] == 0.0 and config["bias"] == "none"
    assert sorted(config["target_modules"]) == sorted(t.name for t in targets)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(targets)
    for t in targets:
        assert tensors[f"base_model.model.{t.name}.lora_A.weight"].shape == (cfg.hyper.rank, t.in_features)
        assert tensors[f"base_model.model.{t.name}.lora_B.weight"].shape == (t.out_features, cfg.hyper.rank)
    info = json.loads((folder / "export.json").read_text())
    assert info["step"] == 7 and info["config_hash"] == config_hash(cfg) and info["dropped_targets"] == []


def test_batch_mode_writes_one_adapter_per_prompt(trained, tmp_path, qwen_tokenizer):
    cfg, student, targets, hypernet, root = trained
    jsonl = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"name": "a", "prompt": PROMPT}), "", json.dumps({"name": "b", "prompt": OTHER_PROMPT})]
    jsonl.write_text("\n".join(lines) + "\n")
    folders = export_lora(root / "checkpoints" / "step-00000007", read_prompts_jsonl(jsonl), tmp_path / "out")
    assert [f.name for f in folders] == ["a", "b"]
    input_ids = torch.tensor([[1, 2, 3]])
    for folder, prompt in zip(folders, (PROMPT, OTHER_PROMPT)):
        _, lora = _in_training_logits(cfg, student, targets, hypernet, qwen_tokenizer, prompt, input_ids)
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        name = targets[0].name
        torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_B.weight"], lora[name][1][0])
    a, b = (load_file(str(f / "adapter_model.safetensors")) for f in folders)
    key = f"base_model.model.{targets[0].name}.lora_B.weight"
    assert not torch.allclose(a[key], b[key])  # different tasks, different adapters


def test_refuses_a_checkpoint_from_another_student(trained, tmp_path, tmp_path_factory, qwen_tokenizer):
    cfg, _, _, hypernet, root = trained
    src = checkpoint.step_dir(root, 7)
    # config.json says the checkpoint was trained on another student folder than the config resolves to.
    meta = json.loads((src / "config.json").read_text())
    meta["student"] = str(tmp_path / "elsewhere")
    moved = tmp_path / "ckpt"
    moved.mkdir()
    for f in src.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    (moved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="trained on student .*elsewhere"):
        export_lora(moved, [("t", PROMPT)], tmp_path / "out")

    # A config pointing at a student whose targets have other shapes (here: 8 layers, wider DeltaNet).
    other = _save_student(tmp_path_factory.mktemp("other"), qwen_tokenizer, num_hidden_layers=8,
                          layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
                          + ["full_attention"], linear_num_value_heads=8)  # fmt: skip
    other_cfg = _run_config(other)
    other_cfg.hyper = cfg.hyper
    other_root = tmp_path / "other_run"
    _save_checkpoint(other_root, other_cfg, hypernet, other)  # trained on the tiny student's targets
    with pytest.raises(UserError, match="does not match the targets resolved on this student"):
        export_lora(other_root, [("t", PROMPT)], tmp_path / "out2")


def test_refuses_edited_configs_and_bad_inputs(trained, tmp_path):
    _, _, _, _, root = trained
    src = checkpoint.step_dir(root, 7)
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in src.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    meta = json.loads((src / "config.json").read_text())
    meta["config"]["hyper"]["rank"] = 8
    (edited / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match its hash"):
        export_lora(edited, [("t", PROMPT)], tmp_path / "o")
    with pytest.raises(UserError, match="neither a checkpoint step folder"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(UserError, match="name used twice"):
        export_lora(root, [("t", PROMPT), ("t", OTHER_PROMPT)], tmp_path / "o")
    with pytest.raises(UserError, match="empty prompt"):
        export_lora(root, [("t", "  ")], tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "a", "prompt": "x"}\n{"name": "b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'prompt'"):
        read_prompts_jsonl(bad)


def test_servable_only_keeps_the_modules_vllm_serves(trained, tmp_path):
    _, _, targets, _, root = trained
    # On qwen3_next vLLM serves every linear the hypernetwork can target: nothing is dropped.
    (folder,) = export_lora(root, [("t", PROMPT)], tmp_path, servable_only=True)
    assert json.loads((folder / "export.json").read_text())["dropped_targets"] == []
    assert {t.kind for t in targets} <= VLLM_LORA_MODULES["qwen3_next"]
    # The restriction itself: a kind vLLM has no LoRA layer for is dropped, an unknown architecture refused.
    conv = Target("model.layers.0.linear_attn.conv1d_proj", 0, "conv1d_proj", 4, 8)
    kept, dropped = servable_targets(targets + [conv], "qwen3_next")
    assert kept == targets and dropped == [conv]
    with pytest.raises(UserError, match="no record of which modules vLLM serves"):
        servable_targets(targets, "llama4")


def test_cli_writes_the_adapter_at_out_and_reports_errors(trained, tmp_path):
    _, _, targets, _, root = trained
    prompt_file = tmp_path / "task.md"
    prompt_file.write_text(PROMPT)
    runner = CliRunner()
    args = ["--checkpoint", str(root), "--prompt", str(prompt_file), "--out", str(tmp_path / "adapter")]
    result = runner.invoke(export_lora_cmd, args)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "adapter" / "export.json").read_text())
    assert info["prompt"] == PROMPT and info["targets"] == len(targets)
    result = runner.invoke(export_lora_cmd, ["--checkpoint", str(root), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "exactly one of --prompt and --prompts-jsonl" in result.output


@pytest.mark.engine
def test_vllm_loads_the_exported_adapter(trained, tmp_path, student_dir):
    """vLLM (CPU) accepts the exported adapter and refuses one with a module it has no LoRA layer for.

    Generation with LoRA cannot run on CPU for this MoE architecture (see the README's serving note:
    enable_lora forces vLLM's Triton MoE kernel), so this checks adapter loading, not outputs.
    """
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    cfg, _, _, _, root = trained
    (good,) = export_lora(root, [("good", PROMPT)], tmp_path, servable_only=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(str(good / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.linear_attn.norm.lora_A.weight"] = torch.zeros(cfg.hyper.rank, 128)
    tensors["base_model.model.model.layers.0.linear_attn.norm.lora_B.weight"] = torch.zeros(128, cfg.hyper.rank)
    from safetensors.torch import save_file

    save_file(tensors, str(bad / "adapter_model.safetensors"))

    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # small KV cache; also skips the warm-up pass
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: seconds to start, not a minute
    # max_lora_rank takes one of 1, 8, 16, 32, ... and must be >= the adapter's r (4 here).
    llm = LLM(model=student_dir, dtype="bfloat16", enable_lora=True, max_lora_rank=8, max_loras=1,
              max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.5)  # fmt: skip
    try:
        assert llm.llm_engine.add_lora(LoRARequest("good", 1, str(good)))
        assert 1 in llm.llm_engine.list_loras()
        with pytest.raises(Exception, match="linear_attn.norm"):
            llm.llm_engine.add_lora(LoRARequest("bad", 2, str(bad)))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        mp.undo()
