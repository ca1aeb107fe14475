"""Shared fixtures. Expensive objects are session-scoped: the suite must stay under 10 minutes on 2 cores."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen vocabulary with our chat template (about 2 s to build)."""
    from common.tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer()
