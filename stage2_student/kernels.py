"""Which implementation the student's layers run: Qwen3-Next's Gated DeltaNet layers use the
`flash-linear-attention` kernels (the chunked gated delta rule) and `causal-conv1d` (the short convolution)
when those packages import, and otherwise fall back to transformers' reference PyTorch code: correct, and
over an order of magnitude slower on a GPU. CPU installs stay without them (some versions of the fast path
assume CUDA); the `gpu` extra installs both, and `preflight` fails on a CUDA machine where one is missing.
"""

from __future__ import annotations

import importlib

# Distribution name -> the module transformers imports it by (transformers.integrations.hub_kernels).
FAST_KERNELS = {"flash-linear-attention": "fla.ops.gated_delta_rule", "causal-conv1d": "causal_conv1d"}


def fast_kernels_installed() -> dict[str, bool]:
    """Distribution -> whether its module imports here."""
    installed = {}
    for dist, module in FAST_KERNELS.items():
        try:
            importlib.import_module(module)
            installed[dist] = True
        except Exception:  # ImportError, or a CUDA-only package failing at import on this machine
            installed[dist] = False
    return installed


def layer_paths(layer_types: list[str], installed: dict[str, bool], attn_implementation: str) -> list[str]:
    """One line per layer: its kind and the implementation it runs."""
    delta = "fla kernels" if installed["flash-linear-attention"] else "reference PyTorch"
    conv = "causal-conv1d" if installed["causal-conv1d"] else "reference PyTorch"
    return [f"layer {i}: {kind}: " + (f"gated delta rule {delta}, short conv {conv}" if kind == "linear_attention"
                                      else f"attention {attn_implementation}")
            for i, kind in enumerate(layer_types)]  # fmt: skip


def fast_path_problem(cuda: bool, layer_types: list[str], installed: dict[str, bool]) -> str | None:
    """Why this machine would run the student's linear-attention layers slowly, or None: only a CUDA machine
    with Gated DeltaNet layers needs the fast kernels."""
    if not cuda or "linear_attention" not in layer_types:
        return None
    missing = [dist for dist, ok in installed.items() if not ok]
    if not missing:
        return None
    n = layer_types.count("linear_attention")
    return (f"CUDA is available but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            f"the {n} Gated DeltaNet layers would run the reference PyTorch code (correct, >10x slower); install "
            "the gpu extra (make install VLLM=gpu)")


def describe_student_kernels(config, cuda: bool) -> str:
    """The log line stage 2 prints at start: per layer, which path it uses."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    if not layer_types:
        return "student kernels: no layer_types in the config (not a hybrid model)"
    installed = fast_kernels_installed()
    attn = getattr(config, "_attn_implementation", None) or "default"
    lines = layer_paths(layer_types, installed, attn)
    problem = fast_path_problem(cuda, layer_types, installed)
    return "student kernels:\n  " + "\n  ".join(lines) + (f"\n  WARNING: {problem}" if problem else "")
