"""`hyperdistill plan`: the shipped configs plan, the real run lands in a sane band, configs that cannot fit
are refused by how much, and the throughput model scales as it says.

Reference numbers come from the published models and the run config, not from the planner: the models'
Hugging Face model cards give 480B / 79.7B parameters, FP8 teacher weights of ~480 GB (~60 GB per GPU at
TP8), and the student's bf16 weights are 2 bytes x 79.7B = 159 GB.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from common.config import load_config
from common.errors import UserError
from hyperdistill.cli import plan_cmd
from hyperdistill.plan import format_plan, mean_context, plan_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REAL = CONFIGS / "qwen3_coder.yaml"
TWO_NODE = CONFIGS / "qwen3_coder_2node.yaml"


# The real config's stage 1 runs vLLM's DP8 + EP recipe; the TP8 + EP single-engine layout is its alternative.
TP8_ENGINE = ["teacher.tensor_parallel_size=8", "teacher.data_parallel_size=1"]


@pytest.fixture(scope="module")
def real_plan():
    return plan_run(load_config(REAL, TP8_ENGINE), gpus=8, gpu_mem_gb=141)


@pytest.fixture(scope="module")
def real_dp_plan():
    return plan_run(load_config(REAL), gpus=8, gpu_mem_gb=141)


def test_real_plan_is_in_a_sane_band(real_plan):
    plan = real_plan
    assert plan.teacher.params == pytest.approx(480e9, rel=0.01)
    assert plan.student.params == pytest.approx(79.7e9, rel=0.01)
    assert 30e9 < plan.teacher.active_params < 40e9 and 2.5e9 < plan.student.active_params < 4e9  # A35B, A3B
    # Stage 1: FP8 weights ~60 GB per GPU at TP8, one engine on the node, the whole data set prefilled once.
    assert plan.stage1.memory["weights"] == pytest.approx(60, rel=0.05)
    assert plan.stage1.engines == 1 and plan.stage1.tokens == plan.data.total_tokens
    assert plan.stage1.kv_tokens >= 32_768
    assert 1 < plan.stage1.hours < 24
    # Stage 2: 20,000 samples x 20 epochs / (1 sample x 8 ranks x 4 accumulation) = 12,500 steps.
    main = {p.name: p for p in plan.stage2.phases}["main"]
    assert main.steps == 12_500 and main.passes == 400_000
    assert main.tokens <= 400_000 * 8192
    for phase in plan.stage2.phases:
        assert phase.memory["student shard"] == pytest.approx(159.3 / 8, rel=0.01)
        assert phase.memory_gb < 141
    assert 5 < plan.stage2.hours < 100
    assert plan.hours == pytest.approx(plan.stage1.hours + plan.stage2.hours)
    text = format_plan(plan)
    for needle in ("stage 1 teacher-cache", "stage 2 train-student", "check against the seed's plan", "total:"):
        assert needle in text


def test_real_plan_runs_vllms_dp_ep_recipe(real_dp_plan, real_plan):
    """DP8 + EP at TP1: each GPU holds attention, embeddings and lm_head whole (~10 B params of attention at 1
    byte, 2 x 0.93 B of embeddings at 2 bytes) and 1/8 of the 160 experts (62 layers x 160 x 3 x 6144 x 2560
    = 468 B params at 1 byte): ~71 GB; eight front ends; the engine capture's logits are one row chunk."""
    s1, cfg = real_dp_plan.stage1, load_config(REAL)
    assert cfg.teacher.data_parallel_size == 8 and cfg.teacher.enable_expert_parallel
    assert cfg.teacher.capture == "engine"
    experts = 62 * 160 * 3 * 6144 * 2560
    assert real_dp_plan.teacher.expert_params == experts
    assert s1.dp == 8 and s1.ep == 8 and s1.tp == 1 and s1.engines == 8
    assert s1.memory["weights"] == pytest.approx(experts / 8 / 1e9 + 10.1 + 3.7, rel=0.03)
    assert s1.memory["logits"] == pytest.approx(256 * 151_936 * 10 / 1e9)  # vs 14.9 GB for a 16k prefill chunk
    assert s1.compute_hours == pytest.approx(real_plan.stage1.compute_hours)  # the same 8 GPUs' FLOPs
    assert s1.host_hours < s1.compute_hours / 10  # no longer host-bound
    text = format_plan(real_dp_plan)
    assert "DP8 x TP1 + expert parallel (experts over 8 GPUs)" in text and "per DP rank" in text
    public = plan_run(load_config(REAL, ["teacher.capture=public"]), gpus=8, gpu_mem_gb=141).stage1
    assert public.memory["logits"] == pytest.approx(16_384 * 151_936 * 6 / 1e9)
    assert public.host_hours == pytest.approx(s1.tokens / (8 * 34_000) / 3600)


def test_demo_plans_from_its_manifest(tmp_path, qwen_tokenizer):
    from common.manifest import load_manifest, prepare_data

    manifest = tmp_path / "manifest.jsonl"
    cfg = load_config(CONFIGS / "demo.yaml", [f"manifest={manifest}"])
    with pytest.raises(UserError, match="run prepare-data first"):
        plan_run(cfg, gpus=2, gpu_mem_gb=24, gpus_per_node=2)
    prepare_data(cfg, qwen_tokenizer)
    rows = load_manifest(manifest)
    plan = plan_run(cfg, gpus=2, gpu_mem_gb=24, gpus_per_node=2)
    assert plan.stage1.tokens == sum(r["n_tokens"] for r in rows)
    assert plan.data.n_train + len(plan.data.heldout_lengths) == len(rows)
    assert plan.stage1.rows == sum(r["n_assistant_tokens"] for r in rows)  # positions: assistant
    assert "manifest" in format_plan(plan)


def test_refuses_a_student_that_does_not_fit_and_says_by_how_much():
    # The real student alone on one 80 GB GPU (a teacher that fits, so stage 2 is the one refused).
    tiny_teacher = ["teacher.model=tiny-teacher", "teacher.tensor_parallel_size=1", "teacher.data_parallel_size=1",
                    "teacher.quantization=null"]
    cfg = load_config(REAL, tiny_teacher)
    with pytest.raises(UserError) as e:
        plan_run(cfg, gpus=1, gpu_mem_gb=80)
    msg = str(e.value)
    assert msg.startswith("stage 2 (train-student)") and "\n" not in msg
    found = re.search(r"needs ([\d.]+) GB per GPU .*?([\d.]+) GB over the 80 GB", msg)
    needed, over = (float(x) for x in found.groups())
    assert needed > 159 and over == pytest.approx(needed - 80, abs=0.11)


def test_refuses_a_teacher_that_does_not_fit():
    # 8x H100 (80 GB): ~71 GB of FP8 weights per GPU at DP8 + EP (60 at TP8) + activations exceed 0.92 x 80 GB.
    with pytest.raises(UserError, match=r"stage 1 \(teacher-cache\): needs .* GB over teacher.gpu_memory_utilization"):
        plan_run(load_config(REAL), gpus=8, gpu_mem_gb=80)
    with pytest.raises(UserError, match="needs 8 GPUs on a node; the plan has 4"):
        plan_run(load_config(REAL), gpus=4, gpu_mem_gb=141)


def test_refuses_too_little_kv_cache(real_plan):
    # Leave 0.5 GB beside the fixed memory: less than one 32k-token sequence's KV cache (~1 GB at TP8).
    fixed = sum(real_plan.stage1.memory.values())
    cfg = load_config(REAL, [*TP8_ENGINE, f"teacher.gpu_memory_utilization={(fixed + 0.5) / 141}"])
    with pytest.raises(UserError, match=r"fewer than one 32,768-token sequence: [\d.]+ GB short"):
        plan_run(cfg, gpus=8, gpu_mem_gb=141)


def test_doubling_the_gpus_halves_the_hours():
    one, two = (plan_run(load_config(TWO_NODE), gpus=g, gpu_mem_gb=141) for g in (8, 16))
    assert two.stage1.engines == 2 * one.stage1.engines
    # Each node starts its engine once; the work after that splits evenly.
    assert two.stage1.start_hours == one.stage1.start_hours
    assert two.stage1.hours - two.stage1.start_hours == pytest.approx((one.stage1.hours - one.stage1.start_hours) / 2)
    assert two.stage2.replicate == 2 and two.stage2.shard == one.stage2.shard == 8
    main1, main2 = ({p.name: p for p in plan.stage2.phases}["main"] for plan in (one, two))
    assert main2.passes == main1.passes and main2.micro_steps * 2 == main1.micro_steps
    assert main2.hours == pytest.approx(main1.hours / 2, rel=1e-6)
    # The short phases lose up to a global batch to rounding; the whole stage stays within 2% of half.
    assert two.stage2.hours == pytest.approx(one.stage2.hours / 2, rel=0.02)


def test_mean_context_of_one_sequence_is_half_its_length():
    import numpy as np

    assert mean_context(np.array([4096.0])) == 2048.0
    # Longer sequences weigh more: tokens of a 3k sequence outnumber those of a 1k one three to one.
    assert mean_context(np.array([1000.0, 3000.0])) == pytest.approx((1000**2 + 3000**2) / (2 * 4000))


def test_cli_prints_the_plan_or_one_error_line():
    runner = CliRunner()
    ok = runner.invoke(plan_cmd, ["--config", str(TWO_NODE), "--gpus", "16"])
    assert ok.exit_code == 0, ok.output
    assert "8 shard x 2 replicate (HSDP)" in ok.output
    assert "2 engine group(s) x DP8 x TP1 + expert parallel (experts over 8 GPUs) = 16 GPUs" in ok.output
    assert "one job per node (2 nodes)" in ok.output
    bad = runner.invoke(plan_cmd, ["--config", str(REAL), "--gpus", "8", "--gpu-mem-gb", "80"])
    assert bad.exit_code == 2 and bad.output.startswith("error: stage 1 (teacher-cache)")
    assert len(bad.output.strip().splitlines()) == 1


def test_plan_takes_its_config_like_every_command():
    """`plan` takes --config and --set like the other commands, and no positional config any more."""
    runner = CliRunner()
    positional = runner.invoke(plan_cmd, [str(TWO_NODE), "--gpus", "16"])
    assert positional.exit_code == 2 and "unexpected extra argument" in positional.output.lower()
    changed = runner.invoke(plan_cmd, ["--config", str(TWO_NODE), "--gpus", "16", "--set", "train.batch_size=4"])
    assert changed.exit_code == 0, changed.output
    ok = runner.invoke(plan_cmd, ["--config", str(TWO_NODE), "--gpus", "16"])
    assert changed.output != ok.output
