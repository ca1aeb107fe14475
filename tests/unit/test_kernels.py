"""The fast-kernel decision for the student's Gated DeltaNet layers, by its inputs (this machine has no CUDA)."""

from __future__ import annotations

from common.models import load_causal_lm
from stage2_student.kernels import describe_student_kernels, fast_kernels_installed, fast_path_problem, layer_paths

HYBRID = ["linear_attention"] * 3 + ["full_attention"]
BOTH = {"flash-linear-attention": True, "causal-conv1d": True}
NONE = {"flash-linear-attention": False, "causal-conv1d": False}


def test_cuda_without_the_kernels_is_a_problem_naming_what_is_missing():
    problem = fast_path_problem(True, HYBRID * 12, NONE)
    assert "flash-linear-attention and causal-conv1d are not installed" in problem and "36 Gated DeltaNet" in problem
    one = fast_path_problem(True, HYBRID, {**BOTH, "causal-conv1d": False})
    assert "causal-conv1d is not installed" in one and "flash-linear-attention" not in one


def test_no_problem_with_the_kernels_without_cuda_or_without_linear_layers():
    assert fast_path_problem(True, HYBRID, BOTH) is None
    assert fast_path_problem(False, HYBRID, NONE) is None  # CPU: the reference code is the path
    assert fast_path_problem(True, ["full_attention"] * 4, NONE) is None  # nothing to accelerate


def test_layer_paths_name_each_layers_implementation():
    lines = layer_paths(HYBRID, {"flash-linear-attention": True, "causal-conv1d": False}, "sdpa")
    assert lines == [
        *(f"layer {i}: linear_attention: gated delta rule fla kernels, short conv reference PyTorch" for i in range(3)),
        "layer 3: full_attention: attention sdpa",
    ]


def test_the_tiny_student_on_this_cpu_install_runs_the_reference_code():
    # CPU installs carry neither package (the gpu extra does).
    assert fast_kernels_installed() == NONE
    student = load_causal_lm("tiny-student", "float32")
    text = describe_student_kernels(student.config, cuda=False)
    assert text.count("gated delta rule reference PyTorch, short conv reference PyTorch") == 3
    assert "layer 3: full_attention: attention" in text and "WARNING" not in text
    assert "WARNING: CUDA is available but" in describe_student_kernels(student.config, cuda=True)
