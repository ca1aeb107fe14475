"""The embedded tiny models: real architectures, real vocabulary, a teacher worth distilling, safe caching.

The first test to ask for `tiny_folders` builds both models when no cached build exists (about 3 minutes on
2 cores, once); later runs load the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common import models, tiny_models
from common.errors import UserError
from common.pretrain import heldout_code_texts, stream_rows, token_stream
from common.tokenizer import FIRST_SPECIAL_ID, SPECIAL_TOKENS, chat_template_fingerprint, tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[2]
QWEN_VOCAB_ROWS = 151_936  # vocab_size in both real models' published config.json


@pytest.fixture(scope="module")
def tiny_folders() -> dict[str, str]:
    return models.build_tiny_models()


@pytest.fixture(scope="module")
def heldout_rows(qwen_tokenizer) -> torch.Tensor:
    """[2, 257] token ids of stdlib modules that pretraining never saw."""
    return stream_rows(token_stream(qwen_tokenizer, heldout_code_texts(), 2 * 256 + 1), 256)


def _next_token_stats(model, rows: torch.Tensor) -> tuple[float, float]:
    """(mean entropy in nats, top-1 accuracy) of the full-vocabulary next-token distribution."""
    entropies, hits = [], []
    with torch.no_grad():
        for row in rows:
            logp = torch.log_softmax(model(input_ids=row[None, :-1]).logits[0].float(), dim=-1)  # [T, V]
            entropies.append(-(logp.exp() * logp).sum(-1))
            hits.append(logp.argmax(-1) == row[1:])
    return torch.cat(entropies).mean().item(), torch.cat(hits).float().mean().item()


# ---------------------------------------------------------------------------------------------
# The built folders


def test_teacher_has_the_real_moe_architecture(tiny_folders):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folders["tiny-teacher"])
    assert model.config.model_type == "qwen3_moe"
    assert model.config.vocab_size == QWEN_VOCAB_ROWS
    assert model.get_input_embeddings().weight.shape[0] == QWEN_VOCAB_ROWS
    assert model.get_output_embeddings().weight.shape[0] == QWEN_VOCAB_ROWS
    names = {name for name, _ in model.named_modules()}
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate", "mlp.experts")
    for i in range(model.config.num_hidden_layers):  # experts in every layer
        for leaf in leaves:
            assert f"model.layers.{i}.{leaf}" in names


def test_student_has_the_real_hybrid_architecture(tiny_folders):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folders["tiny-student"])
    assert model.config.model_type == "qwen3_next"
    assert model.get_input_embeddings().weight.shape[0] == QWEN_VOCAB_ROWS
    layer_types = model.config.layer_types
    assert {"linear_attention", "full_attention"} <= set(layer_types)
    names = {name for name, _ in model.named_modules()}
    for i, kind in enumerate(layer_types):
        if kind == "linear_attention":
            leaves = ("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba", "linear_attn.out_proj")
        else:
            leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        for leaf in leaves + ("mlp.gate", "mlp.experts", "mlp.shared_expert.up_proj"):
            assert f"model.layers.{i}.{leaf}" in names


@pytest.mark.parametrize("name", tiny_models.TINY_NAMES)
def test_folder_is_a_standard_bf16_checkpoint_with_the_real_tokenizer(tiny_folders, qwen_tokenizer, name):
    from safetensors import safe_open

    folder = Path(tiny_folders[name])
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    assert dtypes == {"BF16"}
    tokenizer = models.load_tokenizer(name)
    for offset, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == FIRST_SPECIAL_ID + offset
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.eos_token_id == 151645
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(qwen_tokenizer)
    assert chat_template_fingerprint(tokenizer) == chat_template_fingerprint(qwen_tokenizer)
    model = models.load_causal_lm(name)
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert 151645 in model.generation_config.eos_token_id


def test_teacher_is_peaked_and_beats_the_student(tiny_folders, heldout_rows):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(tiny_models.teacher_config()).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_folders["tiny-teacher"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_folders["tiny-student"], dtype=torch.float32).eval()
    random_entropy, random_top1 = _next_token_stats(random_model, heldout_rows)
    teacher_entropy, teacher_top1 = _next_token_stats(teacher, heldout_rows)
    student_entropy, student_top1 = _next_token_stats(student, heldout_rows)
    assert teacher_entropy < 0.5 * random_entropy
    assert student_entropy < 0.75 * random_entropy  # a trained model, not noise
    assert teacher_entropy < student_entropy
    assert teacher_top1 > student_top1 > random_top1


# ---------------------------------------------------------------------------------------------
# Resolution


def test_resolve_refuses_a_missing_local_path(tmp_path):
    with pytest.raises(UserError, match="no such local path"):
        models.resolve_model(str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="no such local path"):
        models.resolve_model("tiny-techer")  # a typo is neither a tiny model nor OWNER/NAME


def test_resolve_passes_hub_ids_and_local_paths(tmp_path):
    assert models.resolve_model("Qwen/Qwen3-Coder-Next") == "Qwen/Qwen3-Coder-Next"
    assert models.resolve_model("Qwen/Qwen3-Coder-Next", revision="abc123") == "Qwen/Qwen3-Coder-Next"
    assert models.resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(UserError, match="revision"):
        models.resolve_model(str(tmp_path), revision="main")


def test_tokenizer_without_chat_template_is_refused(tmp_path, qwen_tokenizer):
    qwen_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(UserError, match="no chat template"):
        models.load_tokenizer(str(tmp_path))


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(UserError, match="dtype"):
        models.load_causal_lm(str(tmp_path), dtype="float8")


# ---------------------------------------------------------------------------------------------
# Caching: one build, even when several processes ask at once; stale builds are replaced.

# Replaces the real build with a cheap one that records each call, and holds the lock until the other
# process has started, so that both really ask at the same time.
_FAKE_BUILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from common import models, tiny_models

    log = Path(os.environ["BUILD_LOG"])
    Path(log.parent, f"started-{os.getpid()}").touch()

    def fake_write(name, folder):
        with log.open("a") as f:
            f.write(f"{os.getpid()} {name}\\n")
        deadline = time.monotonic() + 60
        while len(list(log.parent.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(str(os.getpid()))

    tiny_models.write_tiny_model = fake_write
    print(models.resolve_model("tiny-student"))
    """
)


def test_concurrent_resolve_builds_once(tmp_path):
    env = {**os.environ, "HYPERDISTILL_HOME": str(tmp_path / "home"), "BUILD_LOG": str(tmp_path / "builds.log")}
    procs = [
        subprocess.Popen([sys.executable, "-c", _FAKE_BUILD], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1] == str(tmp_path / "home" / "models" / "tiny-student")
    builds = (tmp_path / "builds.log").read_text().splitlines()
    assert len(builds) == 1
    folder = Path(outputs[0])
    assert (folder / "config.json").read_text() == builds[0].split()[0]  # the builder's own output
    assert (folder / tiny_models.MARKER_FILE).read_text().strip() == tiny_models.RECIPE_VERSION
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == ["tiny-student"]


def test_stale_build_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERDISTILL_HOME", str(tmp_path))
    stale = tmp_path / "models" / "tiny-teacher"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("old")
    (stale / tiny_models.MARKER_FILE).write_text("0-old-recipe\n")
    calls = []

    def fake_write(name, folder):
        calls.append(name)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("new")

    monkeypatch.setattr(tiny_models, "write_tiny_model", fake_write)
    assert models.resolve_model("tiny-teacher") == str(stale)
    assert (stale / "config.json").read_text() == "new"
    assert models.resolve_model("tiny-teacher") == str(stale)  # current now: no second build
    assert calls == ["tiny-teacher"]


def test_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERDISTILL_HOME", str(tmp_path))

    def broken_write(name, folder):
        folder.mkdir(parents=True)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tiny_models, "write_tiny_model", broken_write)
    with pytest.raises(RuntimeError, match="interrupted"):
        models.resolve_model("tiny-student")
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


# ---------------------------------------------------------------------------------------------
# The pretraining corpus


def test_stream_rows_make_every_token_a_target_once():
    stream = torch.arange(23)
    rows = stream_rows(stream, 5)  # [4, 6]
    assert rows.shape == (4, 6)
    targets = rows[:, 1:].reshape(-1)
    assert targets.tolist() == list(range(1, 21))
    assert torch.equal(rows[1:, 0], rows[:-1, -1])  # each row starts where the previous one's targets end


def test_short_corpus_is_an_error(qwen_tokenizer):
    with pytest.raises(ValueError, match="holds"):
        token_stream(qwen_tokenizer, ["def f():\n    return 1\n"], 10_000)
