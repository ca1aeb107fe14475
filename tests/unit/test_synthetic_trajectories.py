"""Published-size synthetic trajectories: their shape, and a mask that is exactly the assistant-written tokens."""

from __future__ import annotations

import json

import numpy as np

from common.config import DataConfig
from common.rendering import render_trajectory
from common.synthetic_trajectories import synthetic_row
from common.trajectories import parse_row


def expected_written(message: dict) -> str:
    """What the assistant wrote in one turn, as the chat template lays it out (its text, each tool call in the
    qwen3_coder XML form, the end-of-turn token), computed here independently of the renderer."""
    parts = [message["content"] or ""]
    for j, call in enumerate(message["tool_calls"] or []):
        fn = call["function"]
        args = json.loads(fn["arguments"])
        if message["content"] or j:
            parts.append("\n")
        body = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                       for k, v in args.items())  # fmt: skip
        parts.append(f"<tool_call>\n<function={fn['name']}>\n{body}</function>\n</tool_call>")
    return "".join(parts) + "<|im_end|>"


def mask_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_generated_rows_have_the_published_shape():
    row = synthetic_row(3)
    messages = row["trajectory"]
    assert len(messages) >= 100 and isinstance(row["resolved"], int) and not isinstance(row["resolved"], bool)
    assert all(set(m) == {"role", "content", "name", "tool_call_id", "tool_calls"} for m in messages)
    tool_outputs = [m["content"] for m in messages if m["role"] == "tool"]
    assert sum(len(t) >= 2000 for t in tool_outputs) > len(tool_outputs) // 2
    assert any(len(m["tool_calls"] or []) >= 2 for m in messages)  # parallel calls
    assert all(isinstance(c["function"]["arguments"], str) for m in messages for c in m["tool_calls"] or [])
    assert len(messages[0]["content"]) >= 6000 and len(json.dumps(row["tools"])) >= 5000
    assert all(len(t["function"]["parameters"]["properties"]) == 12 for t in row["tools"])  # union form
    assert 200_000 < len(json.dumps(row)) < 400_000
    assert synthetic_row(3) == row and synthetic_row(4) != row


def test_mask_of_a_generated_trajectory_is_exactly_the_assistant_written_tokens(qwen_tokenizer):
    row = synthetic_row(7, assistant_turns=52, tool_output_chars=2500)
    traj = parse_row(row, "synthetic:7")
    sample = render_trajectory(traj, qwen_tokenizer, DataConfig(max_tokens=200_000))
    assert len(sample.input_ids) > 30_000
    runs = mask_runs(sample.loss_mask)
    assistants = [m for m in row["trajectory"] if m["role"] == "assistant"]
    assert len(runs) == len(assistants) == 52
    for (start, end), message in zip(runs, assistants):
        assert qwen_tokenizer.decode(sample.input_ids[start:end].tolist()) == expected_written(message)
    # Everything else is what the template and the environment wrote: system, user, tool turns, headers.
    rest = qwen_tokenizer.decode(sample.input_ids[~sample.loss_mask].tolist())
    assert rest.count("<|im_start|>assistant\n") == 52 and "<|im_end|>" in rest
    assert all(m["content"] in rest for m in row["trajectory"] if m["role"] == "tool")
