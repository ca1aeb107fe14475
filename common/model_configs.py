"""Model configs without weights: the tiny models' recipes, a local folder, the Hugging Face cache, or
built-in transcriptions of the config.json files published in the models' Hugging Face repositories
(Qwen/Qwen3-Coder-480B-A35B-Instruct, Qwen/Qwen3-Coder-Next) when nothing is local, so
that `plan`, `param-count` and `preflight` work offline for the real models."""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError


def _qwen3_coder_480b():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=151_936, hidden_size=6144, intermediate_size=8192, moe_intermediate_size=2560,
        num_hidden_layers=62, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        num_experts=160, num_experts_per_tok=8, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=262_144, tie_word_embeddings=False,
    )  # fmt: skip


def _qwen3_coder_next():
    from transformers import Qwen3NextConfig

    # Qwen3NextConfig's defaults are the 80B-A3B shape (48 layers, hidden 2048, 16/2 heads of 256,
    # DeltaNet 16 key / 32 value heads of 128, 512 experts top-10 of width 512, vocab 151,936).
    return Qwen3NextConfig(rope_theta=5_000_000.0, max_position_embeddings=262_144, tie_word_embeddings=False)


PUBLISHED_MODELS = {
    "Qwen/Qwen3-Coder-480B-A35B-Instruct": _qwen3_coder_480b,
    "Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8": _qwen3_coder_480b,
    "Qwen/Qwen3-Coder-Next": _qwen3_coder_next,
}
"""Built-in transcriptions of the config.json files in these Hugging Face repositories, used when none is local."""


def model_config(name: str, revision: str | None, trust_remote_code: bool):
    """(transformers config, where it came from)."""
    from transformers import AutoConfig

    from common.tiny_models import _CONFIGS

    if name in _CONFIGS:
        return _CONFIGS[name](), "the tiny model's recipe"
    local = Path(name)
    if (local / "config.json").is_file():
        return AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code), f"{local / 'config.json'}"
    try:  # a copy in the Hugging Face cache, if the model was ever downloaded here
        config = AutoConfig.from_pretrained(
            name, revision=revision, local_files_only=True, trust_remote_code=trust_remote_code
        )
        return config, "config.json in the Hugging Face cache"
    except (OSError, ValueError):
        pass
    if name in PUBLISHED_MODELS:
        return PUBLISHED_MODELS[name](), "built-in transcription of the published config.json"
    raise UserError(
        f"model {name!r}: no config.json found locally and no built-in transcription "
        f"(known: {', '.join(sorted(PUBLISHED_MODELS))}); give a local model folder"
    )
