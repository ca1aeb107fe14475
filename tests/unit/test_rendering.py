"""Rendering with the student's chat template: the assistant loss mask, prompts, length policy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.config import DataConfig
from common.errors import UserError
from common.rendering import SampleRejected, render_trajectory, tokenize_with_mask
from common.trajectories import Trajectory, load_trajectories, repository_of

IM_START, IM_END = 151644, 151645


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Fix foo."},
    {"role": "assistant", "content": "Looking.", "tool_calls": [call("bash", command="ls")]},
    {"role": "tool", "content": "a.py\nb.py"},
    {"role": "tool", "content": "second result"},
    {"role": "assistant", "content": "", "tool_calls": [call("edit", path="a.py", line=3)]},
    {"role": "tool", "content": "ok"},
    {"role": "assistant", "content": "  Done: fixed."},  # leading spaces: must stay the assistant's own tokens
]

# Written by hand from the template's format (common/chat_template.jinja), not produced by the code.
EXPECTED_ASSISTANT = [
    "Looking.\n<tool_call>\n<function=bash>\n<parameter=command>\nls\n</parameter>\n</function>\n"
    "</tool_call><|im_end|>",
    "<tool_call>\n<function=edit>\n<parameter=path>\na.py\n</parameter>\n<parameter=line>\n3\n</parameter>\n"
    "</function>\n</tool_call><|im_end|>",
    "  Done: fixed.<|im_end|>",
]
EXPECTED_OTHER = [
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nFix foo.<|im_end|>\n<|im_start|>assistant\n",
    "\n<|im_start|>user\n<tool_response>\na.py\nb.py\n</tool_response>\n<tool_response>\nsecond result\n"
    "</tool_response><|im_end|>\n<|im_start|>assistant\n",
    "\n<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    "\n",
]


def runs(tokenizer, ids, mask, value):
    """Decoded text of each maximal run of tokens whose mask equals `value`."""
    out, start = [], None
    for i, m in enumerate([*mask.tolist(), not value]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            out.append(tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=False))
            start = None
    return out


def traj(messages, tools=(), tid="s1"):
    return Trajectory(tid, "inst-1", True, list(messages), list(tools), "openai", "test:1")


def test_mask_covers_exactly_what_the_assistant_wrote(qwen_tokenizer):
    ids, mask = tokenize_with_mask(qwen_tokenizer, MESSAGES, [], "s1")
    assert ids.dtype == np.uint32 and mask.dtype == bool and ids.shape == mask.shape
    assert runs(qwen_tokenizer, ids, mask, True) == EXPECTED_ASSISTANT
    assert runs(qwen_tokenizer, ids, mask, False) == EXPECTED_OTHER
    full = qwen_tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert qwen_tokenizer.decode(ids.tolist(), skip_special_tokens=False) == full
    # Each assistant <|im_end|> is trained on; the newline after it and every header are not.
    ends = np.flatnonzero((ids == IM_END) & mask)
    assert len(ends) == 3 and not mask[ends + 1].any()
    assert not mask[ids == IM_START].any()


def test_mask_with_tools_in_the_system_turn(qwen_tokenizer):
    tools = [{"type": "function", "function": {"name": "bash", "description": "Run it.", "parameters": {
        "type": "object", "properties": {"command": {"type": "string", "description": "what"}}}}}]
    ids, mask = tokenize_with_mask(qwen_tokenizer, MESSAGES[1:], tools, "s1")
    unmasked = "".join(runs(qwen_tokenizer, ids, mask, False))
    assert "<name>bash</name>" in unmasked and "Fix foo." in unmasked and "second result" in unmasked
    assert runs(qwen_tokenizer, ids, mask, True) == EXPECTED_ASSISTANT


BROKEN_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{- '<|im_start|>system\\n' + m.content + ' (' + (messages | length | string)"
    " + ' turns)<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def test_template_that_is_not_prefix_stable_is_refused(qwen_tokenizer, monkeypatch):
    monkeypatch.setattr(qwen_tokenizer, "chat_template", BROKEN_TEMPLATE)
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    with pytest.raises(UserError, match="sample s7: chat template is not prefix-stable at message 2"):
        render_trajectory(traj(messages, tid="s7"), qwen_tokenizer, DataConfig())


def test_template_that_fails_to_render_is_a_user_error(qwen_tokenizer, monkeypatch):
    monkeypatch.setattr(qwen_tokenizer, "chat_template", "{{ messages[0].content + 1 }}")
    with pytest.raises(UserError, match="sample s8: chat template failed on the first 8 messages"):
        render_trajectory(traj(MESSAGES, tid="s8"), qwen_tokenizer, DataConfig())


def test_task_prompt_variants(qwen_tokenizer):
    t = traj(MESSAGES)
    plain = render_trajectory(t, qwen_tokenizer, DataConfig())
    assert qwen_tokenizer.decode(plain.prompt_ids.tolist()) == "Fix foo."
    both = render_trajectory(t, qwen_tokenizer, DataConfig(prompt="system_and_first_user"))
    assert qwen_tokenizer.decode(both.prompt_ids.tolist()) == "You are terse.\n\nFix foo."
    cut = render_trajectory(t, qwen_tokenizer, DataConfig(prompt="system_and_first_user", max_prompt_tokens=3))
    assert cut.prompt_ids.dtype == np.uint32
    plain_ids = qwen_tokenizer("You are terse.\n\nFix foo.", add_special_tokens=False)["input_ids"]
    assert cut.prompt_ids.tolist() == plain_ids[:3]


def test_repository_prompt_names_the_instance_repository_alone(qwen_tokenizer):
    t = dataclasses.replace(traj(MESSAGES), instance_id="scikit-learn__scikit-learn-13142")
    repo = render_trajectory(t, qwen_tokenizer, DataConfig(prompt="repository"))
    assert qwen_tokenizer.decode(repo.prompt_ids.tolist()) == "Repository: scikit-learn/scikit-learn"
    assert repository_of("acme__cli-lark-2003") == "acme/cli-lark"
    for bad in ("inst-1", "owner__name", "owner__name-x1", "__name-3", "owner__-3"):
        assert repository_of(bad) is None, bad
    with pytest.raises(SampleRejected, match="sample s1: data.prompt=repository: instance id 'inst-1'") as e:
        render_trajectory(traj(MESSAGES), qwen_tokenizer, DataConfig(prompt="repository"))
    assert e.value.reason == "no_repository"


def test_samples_without_user_or_assistant_are_rejected(qwen_tokenizer):
    with pytest.raises(SampleRejected) as e:
        render_trajectory(traj([MESSAGES[0], MESSAGES[2]]), qwen_tokenizer, DataConfig())
    assert e.value.reason == "no_user_message"
    with pytest.raises(SampleRejected) as e:
        render_trajectory(traj(MESSAGES[:2]), qwen_tokenizer, DataConfig())
    assert e.value.reason == "no_assistant_message"


def test_overlong_skip_versus_truncate_and_too_short(qwen_tokenizer):
    t = traj(MESSAGES)
    full = render_trajectory(t, qwen_tokenizer, DataConfig())
    n = len(full.input_ids)
    assert not full.truncated
    with pytest.raises(SampleRejected) as e:
        render_trajectory(t, qwen_tokenizer, DataConfig(max_tokens=n - 5, overlong="skip"))
    assert e.value.reason == "too_long"
    cut = render_trajectory(t, qwen_tokenizer, DataConfig(max_tokens=n - 5, overlong="truncate"))
    assert cut.truncated and len(cut.input_ids) == len(cut.loss_mask) == n - 5
    assert np.array_equal(cut.input_ids, full.input_ids[: n - 5])
    assert np.array_equal(cut.loss_mask, full.loss_mask[: n - 5])
    exact = render_trajectory(t, qwen_tokenizer, DataConfig(max_tokens=n, overlong="skip"))
    assert len(exact.input_ids) == n and not exact.truncated
    with pytest.raises(SampleRejected) as e:
        render_trajectory(t, qwen_tokenizer, DataConfig(min_tokens=n + 1, max_tokens=n + 100))
    assert e.value.reason == "too_short"
    # Cut before the first assistant token: nothing left to learn from.
    with pytest.raises(SampleRejected) as e:
        render_trajectory(t, qwen_tokenizer, DataConfig(max_tokens=5, overlong="truncate"))
    assert e.value.reason == "no_assistant_tokens"


def test_bundled_sample_masks_are_sane(qwen_tokenizer):
    cfg = DataConfig(resolved_only=False)
    trajectories, _ = load_trajectories(cfg)
    for t in trajectories:
        s = render_trajectory(t, qwen_tokenizer, cfg)
        masked = runs(qwen_tokenizer, s.input_ids, s.loss_mask, True)
        assert len(masked) == sum(m["role"] == "assistant" for m in t.messages), t.id
        for text in masked:
            assert text.endswith("<|im_end|>") and text.count("<|im_end|>") == 1
            assert "<|im_start|>" not in text and "<tool_response>" not in text
        assert 0.05 < s.loss_mask.mean() < 0.6
