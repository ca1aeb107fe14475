"""Every tiny-model recipe's corpus holds the tokens its steps x batch x seq_len ask for, checked without training:
a recipe that outgrew its corpus once failed only on a fresh build ("corpus 434,848 tokens, 614,401 asked")."""

from __future__ import annotations

import pytest

from common import testbed, tiny_models
from common.pretrain import stream_rows, token_stream


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setattr(testbed, "testbed_home", lambda: tmp_path / "testbed")


def test_every_tiny_model_has_a_recipe_and_a_config():
    names = set(tiny_models.TINY_NAMES + tiny_models.LAZY_NAMES)
    assert set(tiny_models.RECIPES) == names == set(tiny_models._CONFIGS)


@pytest.mark.parametrize("name", sorted(tiny_models.RECIPES))
def test_recipe_corpus_covers_its_steps(name):
    recipe = tiny_models.RECIPES[name]
    _, stream, _ = tiny_models.training_corpus(name)  # raises ValueError when the documents run out
    rows = stream_rows(stream, recipe.seq_len)
    # What pretrain() checks before its first step (the demo's two models share one stream: the student reads a prefix).
    assert rows.shape[0] >= recipe.n_rows and rows.shape[1] == recipe.seq_len + 1


def test_a_short_corpus_is_refused(qwen_tokenizer):
    with pytest.raises(ValueError, match="recipe needs 1000"):
        token_stream(qwen_tokenizer, ["def f():\n    return 1\n"], 1000)
