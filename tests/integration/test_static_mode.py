"""hyper.mode=static (one trainable LoRA for every sample) and the one model builder, end to end on the demo cache.

- at step 0 the static student is the base student exactly (B = 0), and A is initialised like PEFT's lora_A;
- a static run under torchrun (2 gloo ranks, FSDP2), killed after its first checkpoint (here: the newer
  checkpoint deleted) and resumed, ends with the uninterrupted run's weights; its one adapter, exported without a
  prompt, reproduces the in-training student's logits under PEFT;
- a hypernetwork run with a non-default hyper.head_chunk exports, and its adapter reproduces the in-training logits.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from common.config import load_config
from common.models import load_causal_lm, load_tokenizer
from common.rendering import tokenize_prompt
from stage2_student import checkpoint
from stage2_student.export import export_lora
from stage2_student.model import build_distill_model
from tests.pipeline_helpers import REPO, config_overrides, torchrun_train

PROMPT = "Fix the off-by-one error in utils.paginate so that the last page is returned."
INPUT = "def paginate(items, size):\n    return [items[i : i + size] for i in range(0, len(items), size)]\n"
# float32 student: the PEFT comparison is then exact to fp32 rounding. lr 1e-3 so that B moves visibly in 2 steps.
SMALL = ["student.dtype=float32", "train.phases=[{name: main, epochs: 1, seq_len: 512}]", "train.max_steps=2",
         "train.batch_size=1", "train.checkpoint_every=1", "train.eval_every=100", "train.warmup_steps=1",
         "train.lr=1e-3", "train.loss_chunk=256", "hyper.encoder_dim=64", "hyper.generator_dim=128",
         "hyper.encoder_layers=1"]  # fmt: skip


def _config(cache_cfg, out, *extra):
    return load_config(REPO / "configs" / "demo.yaml",
                       [*config_overrides(cache_cfg), f"train.output_dir={out}", *SMALL, *extra])  # fmt: skip


def _weights(path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(keys={"hypernet"}, checkpoint_id=str(path))["hypernet"]


def _in_training_logits(cfg, run_dir, prompt: str | None, input_ids):
    """The trainer's path: build_distill_model on the student, the checkpoint's weights, the LoRA for the prompt
    (the cache's way of tokenising it) through the injector. Returns (logits with the LoRA, base logits)."""
    student = load_causal_lm(cfg.student.model, cfg.student.dtype).eval()
    model = build_distill_model(cfg, student)
    model.hypernet.load_state_dict(_weights(checkpoint.latest_checkpoint(run_dir)))
    text = prompt or "any task"
    ids = tokenize_prompt(load_tokenizer(cfg.student.model), text, cfg.data.max_prompt_tokens)
    prompt_ids = torch.as_tensor(ids.astype("int64"))[None]
    with torch.no_grad():
        base = student(input_ids=input_ids).logits
        with model.lora_scope():
            model.injector.set(model.lora_weights(prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool)))
            got = student(input_ids=input_ids).logits
    return got, base


def _peft_logits(cfg, adapter, input_ids):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_causal_lm(cfg.student.model, cfg.student.dtype), str(adapter)).eval()
    with torch.no_grad():
        return peft_model(input_ids=input_ids).logits


def _input_ids():
    return torch.tensor([load_tokenizer("tiny-student")(INPUT, add_special_tokens=False)["input_ids"]])


def test_static_student_is_the_base_student_at_step_0():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["hyper.mode=static"])
    student = load_causal_lm(cfg.student.model, cfg.student.dtype).eval()
    torch.manual_seed(0)
    model = build_distill_model(cfg, student)
    ids = torch.randint(0, 150_000, (2, 24), generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(0, 150_000, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = student(input_ids=ids).logits
        with model.lora_scope():
            lora = model.lora_weights(prompt, torch.ones_like(prompt, dtype=torch.bool))
            model.injector.set(lora)
            injected = student(input_ids=ids).logits
    assert torch.equal(injected, base)
    assert model.injector.scale == cfg.hyper.alpha / cfg.hyper.rank
    for t in model.targets:
        a, b = lora[t.name]
        assert a.shape == (2, cfg.hyper.rank, t.in_features) and b.shape == (2, t.out_features, cfg.hyper.rank)
        assert torch.equal(a[0], a[1]) and torch.count_nonzero(b) == 0  # one LoRA for every sample, B = 0
        # PEFT's lora_A init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in)), variance 1 / (3 d_in).
        assert a.abs().max() <= 1 / math.sqrt(t.in_features)
        assert 0.7 < a.std().item() * math.sqrt(3 * t.in_features) < 1.3


@pytest.mark.distributed
def test_static_run_resumes_under_fsdp_and_exports_one_adapter(hf_cache_run, tmp_path):
    cache_cfg, _ = hf_cache_run
    out = tmp_path / "static"

    def run():
        return torchrun_train(cache_cfg, out, ["hyper.mode=static"], settings=SMALL)

    first = run()
    assert "static LoRA: " in first.stderr
    final = checkpoint.step_dir(out, 2)
    uninterrupted = _weights(final)
    assert len(uninterrupted) == 2 * 13 and {k.split(".")[0] for k in uninterrupted} == {"a", "b"}  # A, B per target
    assert any(torch.count_nonzero(v) for k, v in uninterrupted.items() if k.startswith("b."))  # B left zero
    shutil.rmtree(final)  # as if killed after the step-1 checkpoint
    resumed = run()
    assert "resumed from" in resumed.stderr and "at step 1" in resumed.stderr
    again = _weights(final)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=1e-6, msg=name)

    # One adapter, no prompt; PEFT on the student gives the in-training logits.
    cfg = _config(cache_cfg, out, "hyper.mode=static")
    (folder,) = export_lora(out, [("static", None)], tmp_path / "adapters")
    info = json.loads((folder / "export.json").read_text())
    assert info["mode"] == "static" and info["prompt"] is None and info["step"] == 2
    input_ids = _input_ids()
    expected, base = _in_training_logits(cfg, out, None, input_ids)
    assert (expected - base).abs().max() > 1e-4  # the trained LoRA changes the student
    torch.testing.assert_close(_peft_logits(cfg, folder, input_ids), expected, rtol=0, atol=2e-5)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert len(tensors) == len(uninterrupted)  # lora_A and lora_B of every target
    with pytest.raises(Exception, match="static LoRA .* without --prompt"):
        export_lora(out, [("t", PROMPT)], tmp_path / "x")


def test_head_chunk_run_exports_an_adapter_that_reproduces_training(hf_cache_run, tmp_path):
    """A non-default hyper.head_chunk reaches every builder: trained with it, the checkpoint exports."""
    from stage2_student.distributed import DistEnv
    from stage2_student.train import train

    cache_cfg, _ = hf_cache_run
    out = tmp_path / "chunk32"
    cfg = _config(cache_cfg, out, "hyper.head_chunk=32")
    train(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    (folder,) = export_lora(out, [("paginate", PROMPT)], tmp_path / "adapters")
    input_ids = _input_ids()
    expected, base = _in_training_logits(cfg, out, PROMPT, input_ids)
    assert (expected - base).abs().max() > 1e-4
    torch.testing.assert_close(_peft_logits(cfg, folder, input_ids), expected, rtol=0, atol=2e-5)
