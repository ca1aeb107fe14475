"""Trajectories with the shape of the published OpenHands ones, for tests and benchmarks.

`synthetic_row` returns one row exactly as nebius/SWE-rebench-openhands-trajectories publishes it: `resolved`
as int 0/1, every message carrying every key of the union (null where unused), tool-call arguments as JSON
strings, `tools` in Arrow's union form, and extra columns. Its size follows the published rows: a long system
prompt and tool schemas, ~64 assistant turns (130 messages), tool outputs of several KB (pytest output padded
with runs of spaces, file listings, source files), a share of turns with parallel tool calls. At the defaults
a row is ~280k characters, ~80k tokens of the Qwen vocabulary. Deterministic in its seed.
"""

from __future__ import annotations

import json
import random

_WORDS = (
    "self return def class import from if else elif for while try except raise with as None True False value "
    "result config parser token buffer index offset length items keys values path file line error message test "
    "assert expected actual request response handler cache limit count total start end node tree child parent "
    "data frame column row schema field record batch stream reader writer encode decode format string bytes"
).split()
_TOOLS = {
    "execute_bash": {"command": "string", "is_input": "string", "timeout": "number"},
    "str_replace_editor": {"command": "string", "path": "string", "file_text": "string", "old_str": "string",
                           "new_str": "string", "insert_line": "integer", "view_range": "array"},
    "think": {"thought": "string"},
    "finish": {"message": "string", "task_completed": "string"},
}  # fmt: skip
_ALL_PROPERTIES = [p for props in _TOOLS.values() for p in props]


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _code(rng: random.Random, lines: int) -> str:
    out = []
    for i in range(lines):
        indent = "    " * rng.randint(0, 3)
        a, b, c = rng.choice(_WORDS), rng.choice(_WORDS), rng.choice(_WORDS)
        out.append(rng.choice([f"{indent}{a}_{b} = {c}({a}, {rng.randint(0, 999)})",
                               f"{indent}def {a}_{b}(self, {c}):", f"{indent}return {a}.{b}[{c}]",
                               f"{indent}if {a} is not None and {b} > {rng.randint(1, 64)}:"]))  # fmt: skip
        if i % 17 == 0:
            out.append("")
    return "\n".join(out)


def _tool_output(rng: random.Random, chars: int) -> str:
    """Several KB of what tools print: numbered source, file listings, pytest output padded with spaces."""
    kind = rng.randrange(3)
    parts: list[str] = []
    size = 0
    n = 1
    while size < chars:
        if kind == 0:
            line = f"{n:6d}\t{_code(rng, 1)}"
        elif kind == 1:
            line = f"/workspace/repo/{rng.choice(_WORDS)}/{rng.choice(_WORDS)}_{rng.choice(_WORDS)}.py"
        else:
            name = f"tests/test_{rng.choice(_WORDS)}.py::test_{rng.choice(_WORDS)}_{rng.choice(_WORDS)}"
            line = name + " " * rng.randint(20, 120) + rng.choice(["PASSED", "PASSED", "FAILED"]) + f" [{n % 100:3d}%]"
        parts.append(line)
        size += len(line) + 1
        n += 1
    return "\n".join(parts)


def _message(role: str, content: str | None, tool_calls=None, name=None, tool_call_id=None) -> dict:
    return {"role": role, "content": content, "name": name, "tool_call_id": tool_call_id, "tool_calls": tool_calls}


def _call(rng: random.Random, call_id: str) -> dict:
    tool = rng.choice(["execute_bash", "execute_bash", "str_replace_editor", "str_replace_editor", "think"])
    if tool == "execute_bash":
        args: dict = {"command": f"cd /workspace/repo && python -m pytest -q tests/test_{rng.choice(_WORDS)}.py",
                      "timeout": rng.choice([30, 60, 120])}  # fmt: skip
    elif tool == "str_replace_editor":
        path = f"/workspace/repo/{rng.choice(_WORDS)}/{rng.choice(_WORDS)}.py"
        args = rng.choice([{"command": "view", "path": path},
                           {"command": "str_replace", "path": path, "old_str": _code(rng, 3), "new_str": _code(rng, 4)}])
    else:
        args = {"thought": _sentence(rng, 40)}
    return {"id": call_id, "type": "function", "function": {"name": tool, "arguments": json.dumps(args)}}


def union_form_tools() -> list[dict]:
    """The OpenHands tools in Arrow's union form: every tool lists every property name, null where it has none."""
    tools = []
    for name, own in _TOOLS.items():
        props: dict = {p: None for p in _ALL_PROPERTIES}
        for p, tp in own.items():
            props[p] = {"type": tp, "description": f"The {p.replace('_', ' ')} for {name}. " + "Details. " * 20,
                        "enum": None, "items": {"type": "integer"} if tp == "array" else None}
        tools.append({"type": "function", "function": {
            "name": name, "description": f"Run {name}. " + "Usage notes and caveats for this tool. " * 30,
            "parameters": {"type": "object", "properties": props, "required": [next(iter(own))],
                           "additionalProperties": None}}})  # fmt: skip
    return tools


def synthetic_row(seed: int, *, assistant_turns: int = 64, tool_output_chars: int = 3500,
                  system_chars: int = 6000, parallel_fraction: float = 0.05) -> dict:
    """One trajectory row in the published SWE-rebench shape (see the module docstring). Each assistant turn
    but the last calls tools (two or three at once in `parallel_fraction` of turns), each call answered by a
    tool message of about `tool_output_chars` characters; the last turn calls `finish`."""
    rng = random.Random(seed)
    system = "You are OpenHands agent, a helpful AI assistant that can interact with a computer to solve tasks.\n"
    while len(system) < system_chars:
        system += "<IMPORTANT>\n* " + _sentence(rng, 30) + "\n</IMPORTANT>\n"
    user = ("<uploaded_files>\n/workspace/repo\n</uploaded_files>\nI've uploaded a python code repository. "
            "Consider the following issue description:\n<issue_description>\n" + _sentence(rng, 80) + "\n```python\n"
            + _code(rng, 12) + "\n```\n</issue_description>\nImplement the necessary changes.")  # fmt: skip
    messages = [_message("system", system), _message("user", user)]
    n_call = 0
    for turn in range(assistant_turns - 1):
        width = rng.choice([2, 3]) if rng.random() < parallel_fraction else 1
        calls = []
        for _ in range(width):
            n_call += 1
            calls.append(_call(rng, f"toolu_{seed:04d}_{n_call:04d}"))
        content = None if rng.random() < 0.3 else _sentence(rng, rng.randint(8, 60))
        messages.append(_message("assistant", content, tool_calls=calls))
        for c in calls:
            out = _tool_output(rng, rng.randint(tool_output_chars // 2, tool_output_chars * 3 // 2))
            messages.append(_message("tool", out, name=c["function"]["name"], tool_call_id=c["id"]))
    finish = {"id": f"toolu_{seed:04d}_end", "type": "function", "function": {
        "name": "finish", "arguments": json.dumps({"message": _sentence(rng, 30), "task_completed": "true"})}}
    messages.append(_message("assistant", _sentence(rng, 20), tool_calls=[finish]))
    return {
        "trajectory_id": f"synthetic-{seed:06d}",
        "instance_id": f"synthetic__repo-{seed % 997}",
        "repo": "synthetic/repo",
        "trajectory": messages,
        "tools": union_form_tools(),
        "model_patch": "diff --git a/x.py b/x.py\n" + _code(rng, 10),
        "exit_status": "submitted",
        "resolved": int(rng.random() < 0.5),
        "gen_tests_correct": round(rng.random(), 3),
        "pred_passes_gen_tests": None,
    }


def write_jsonl(path, n: int, first_seed: int = 0, **shape) -> None:
    """n rows (seeds first_seed, first_seed + 1, ...) to a JSONL file, one at a time."""
    with open(path, "w", encoding="utf-8") as f:
        for seed in range(first_seed, first_seed + n):
            f.write(json.dumps(synthetic_row(seed, **shape)) + "\n")
