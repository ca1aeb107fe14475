"""Rows shaped exactly like the published trajectory datasets (written here from their dataset cards' schemas),
and SWE-agent .traj folders: every field shape they use is read, filtered and rendered."""

from __future__ import annotations

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from common.config import DataConfig, RunConfig
from common.manifest import NothingKept, prepare_data
from common.rendering import render_trajectory
from common.trajectories import MalformedRow, load_trajectories, parse_row

# The 12 property names OpenHands' tools use between them: in Arrow's union form every tool lists all of them.
PROPERTY_NAMES = ["command", "is_input", "timeout", "path", "file_text", "old_str", "new_str", "insert_line",
                  "view_range", "thought", "message", "task_completed"]  # fmt: skip
OWN_PROPERTIES = {
    "execute_bash": {"command": "string", "is_input": "string", "timeout": "number"},
    "str_replace_editor": {"command": "string", "path": "string", "file_text": "string", "old_str": "string",
                           "new_str": "string", "insert_line": "integer", "view_range": "array"},
    "think": {"thought": "string"},
    "finish": {"message": "string", "task_completed": "string"},
}  # fmt: skip


def union_tools() -> list[dict]:
    """`tools` as SWE-rebench stores it: each tool's properties hold all 12 names (null where the tool has no
    such parameter), property specs carry enum: null, parameters carry additionalProperties: null."""
    tools = []
    for name, own in OWN_PROPERTIES.items():
        props = {p: None for p in PROPERTY_NAMES}
        for p, tp in own.items():
            props[p] = {"type": tp, "description": f"The {p} of {name}.", "enum": None, "items": None}
        tools.append({"type": "function", "function": {
            "name": name, "description": f"Tool {name}.",
            "parameters": {"type": "object", "properties": props, "required": [next(iter(own))],
                           "additionalProperties": None}}})  # fmt: skip
    return tools


def msg(role, content, tool_calls=None, name=None, tool_call_id=None) -> dict:
    """A message as SWE-rebench stores it: every key of the union present, null where unused."""
    return {"role": role, "content": content, "name": name, "tool_call_id": tool_call_id, "tool_calls": tool_calls}


def call(call_id: str, name: str, args: dict, as_string: bool = True) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


def swe_rebench_row(traj_id="oh-0001", resolved=1, as_string=True) -> dict:
    """nebius/SWE-rebench-openhands-trajectories: resolved int64 0/1, JSON-string arguments, parallel calls,
    an assistant turn with content null, extra columns."""
    return {
        "trajectory_id": traj_id, "instance_id": "acme__widgets-12", "repo": "acme/widgets",
        "trajectory": [
            msg("system", "You are OpenHands agent, a helpful AI assistant that can interact with a computer."),
            msg("user", "<uploaded_files>\n/workspace/acme__widgets\n</uploaded_files>\nFix the crash in parse()."),
            msg("assistant", None, tool_calls=[
                call("toolu_01", "execute_bash", {"command": "ls /workspace/acme__widgets"}, as_string),
                call("toolu_02", "str_replace_editor", {"command": "view", "path": "/workspace/acme__widgets/w.py"},
                     as_string)]),  # fmt: skip
            msg("tool", "setup.py\nw.py", name="execute_bash", tool_call_id="toolu_01"),
            msg("tool", "     1\tdef parse(x):\n     2\t    return x[0]", name="str_replace_editor",
                tool_call_id="toolu_02"),
            msg("assistant", "The function indexes an empty input.", tool_calls=[
                call("toolu_03", "str_replace_editor", {"command": "str_replace", "path": "/workspace/acme__widgets/w.py",
                     "old_str": "return x[0]", "new_str": "return x[0] if x else None"}, as_string)]),  # fmt: skip
            msg("tool", "The file has been edited.", name="str_replace_editor", tool_call_id="toolu_03"),
            msg("assistant", None, tool_calls=[call("toolu_04", "finish", {"message": "Fixed.", "task_completed": "true"},
                                                    as_string)]),  # fmt: skip
        ],
        "tools": union_tools(),
        "model_patch": "diff --git a/w.py b/w.py\n", "exit_status": "submitted", "resolved": resolved,
        "gen_tests_correct": 0.75, "pred_passes_gen_tests": None,
    }  # fmt: skip


def swe_zero_row(traj_id="sz-0001") -> dict:
    """nvidia/SWE-Zero-openhands-trajectories: no resolved flag, no tools column, messages without the
    name / tool_call_id keys."""
    return {
        "instance_id": "acme__widgets-13", "repo": "acme/widgets", "license": "MIT", "trajectory_id": traj_id,
        "trajectory": [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "Make parse() accept tuples."},
            {"role": "assistant", "content": "Looking.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "execute_bash", "arguments": "{\"command\": \"ls\"}"}}]},
            {"role": "tool", "content": "w.py"},
            {"role": "assistant", "content": "Done: parse() accepts tuples."},
        ],
        "model_patch": "diff --git a/w.py b/w.py\n", "dataset": "SWE-Gym",
    }  # fmt: skip


def swe_agent_published_row(target=True) -> dict:
    """nebius/SWE-agent-trajectories: target bool; messages {role: system|user|ai, text, system_prompt, mask,
    cutoff_date}."""
    return {
        "instance_id": "acme__widgets-14", "model_name": "swe-agent-llama-70b", "target": target,
        "trajectory": [
            {"role": "system", "text": "SETTING: You are an autonomous programmer.", "system_prompt": "SETTING: ...",
             "mask": False, "cutoff_date": "2024-01-01"},
            {"role": "user", "text": "ISSUE: parse() crashes on empty input.", "system_prompt": None, "mask": False,
             "cutoff_date": None},
            {"role": "ai", "text": "Let me look.\n```\nopen w.py\n```", "system_prompt": None, "mask": True,
             "cutoff_date": None},
            {"role": "user", "text": "[File: w.py (2 lines total)]", "system_prompt": None, "mask": False,
             "cutoff_date": None},
            {"role": "ai", "text": "Fixed.\n```\nsubmit\n```", "system_prompt": None, "mask": True, "cutoff_date": None},
        ],
        "exit_status": "submitted", "generated_patch": "diff", "eval_logs": "PASSED",
    }  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def no_nulls(value) -> bool:
    if isinstance(value, dict):
        return all(v is not None and no_nulls(v) for v in value.values())
    if isinstance(value, list):
        return all(no_nulls(v) for v in value)
    return True


# ---------------------------------------------------------------------------------------------
# SWE-rebench


def test_swe_rebench_row_reads_with_every_published_field_shape():
    t = parse_row(swe_rebench_row(), "r.jsonl:1")
    assert t.resolved is True and t.schema == "openai"
    assert parse_row(swe_rebench_row(resolved=0), "r.jsonl:2").resolved is False
    assert parse_row(swe_rebench_row(resolved=True), "r.jsonl:3").resolved is True
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "tool", "tool", "assistant", "tool",
                                               "assistant"]  # fmt: skip
    first = t.messages[2]
    assert first["content"] == ""  # null content on a turn with tool calls
    assert [c["function"]["arguments"] for c in first["tool_calls"]] == [
        {"command": "ls /workspace/acme__widgets"}, {"command": "view", "path": "/workspace/acme__widgets/w.py"}]
    assert "tool_calls" not in t.messages[0] and "name" not in t.messages[0]  # nulls are not carried on
    assert t.messages[3]["name"] == "execute_bash" and t.messages[3]["tool_call_id"] == "toolu_01"
    # JSON-string and dict arguments give the same trajectory; unknown columns change nothing.
    as_dicts = parse_row(swe_rebench_row(as_string=False), "x")
    assert as_dicts.messages == t.messages
    bare = swe_rebench_row()
    for column in ("gen_tests_correct", "pred_passes_gen_tests", "model_patch", "exit_status", "repo"):
        del bare[column]
    assert parse_row(bare, "x").messages == t.messages and parse_row(bare, "x").tools == t.tools


def test_union_form_tools_become_each_tools_own_schema():
    t = parse_row(swe_rebench_row(), "r.jsonl:1")
    assert no_nulls(t.tools)
    for tool in t.tools:
        fn = tool["function"]
        props = fn["parameters"]["properties"]
        assert {p: spec["type"] for p, spec in props.items()} == OWN_PROPERTIES[fn["name"]]
        assert "additionalProperties" not in fn["parameters"]
        assert all("enum" not in spec for spec in props.values())


def test_swe_rebench_row_renders_tools_without_the_nulls(qwen_tokenizer):
    t = parse_row(swe_rebench_row(), "r.jsonl:1")
    sample = render_trajectory(t, qwen_tokenizer, DataConfig())
    text = qwen_tokenizer.decode(sample.input_ids.tolist())
    tools_section = text[text.index("<tools>") : text.index("</tools>")]
    assert "None" not in tools_section and "null" not in tools_section
    bash_block = text[text.index("<name>execute_bash</name>") : text.index("</function>", text.index("execute_bash"))]
    assert bash_block.count("<parameter>") == 3 and "<name>path</name>" not in bash_block
    # Both parallel calls were written by the assistant: they are inside its masked span.
    written = qwen_tokenizer.decode(sample.input_ids[sample.loss_mask].tolist())
    assert "<function=execute_bash>\n<parameter=command>\nls /workspace/acme__widgets\n</parameter>" in written
    assert "<function=str_replace_editor>\n<parameter=command>\nview\n</parameter>" in written
    assert "<tool_response>" not in written


@pytest.mark.parametrize("bad", [2, -1, "1", 0.5])
def test_other_resolution_values_are_malformed_rows_naming_the_field(tmp_path, bad):
    path = write_jsonl(tmp_path / "r.jsonl", [swe_rebench_row("ok"), swe_rebench_row("bad", resolved=bad)])
    kept, report = load_trajectories(DataConfig(source=str(path)))
    assert [t.id for t in kept] == ["ok"]
    assert report.counts == {"malformed": 1}
    (location, detail), = report.examples["malformed"]
    assert location == f"{path}:2" and "'resolved'" in detail and "0/1" in detail


def test_parquet_copy_of_swe_rebench_rows_reads_like_the_jsonl(tmp_path):
    rows = [swe_rebench_row(f"oh-{i}", resolved=i % 2) for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet", row_group_size=2)
    from_pq, report = load_trajectories(DataConfig(source=str(tmp_path)))
    from_jsonl, _ = load_trajectories(DataConfig(source=str(write_jsonl(tmp_path / "r.jsonl", rows))))
    assert [t.id for t in from_pq] == ["oh-1", "oh-3"] and report.counts == {"unresolved": 2}
    assert [(t.messages, t.tools, t.resolved) for t in from_pq] == [(t.messages, t.tools, t.resolved) for t in from_jsonl]


# ---------------------------------------------------------------------------------------------
# SWE-Zero, SWE-agent, and resolved_only


def test_swe_zero_rows_are_kept_under_auto_and_said_so(tmp_path, qwen_tokenizer):
    path = write_jsonl(tmp_path / "z.jsonl", [swe_zero_row("sz-1"), swe_zero_row("sz-2")])
    assert DataConfig().resolved_only == "auto"
    kept, report = load_trajectories(DataConfig(source=str(path)))
    assert [t.id for t in kept] == ["sz-1", "sz-2"] and all(t.resolved is None and t.tools == [] for t in kept)
    assert report.kept_unknown_resolution == 2 and report.dropped == 0
    assert kept[0].messages[3] == {"role": "tool", "content": "w.py"}
    strict, strict_report = load_trajectories(DataConfig(source=str(path), resolved_only=True))
    assert strict == [] and strict_report.counts == {"resolution_unknown": 2}
    cfg = RunConfig()
    cfg.data.source, cfg.manifest = str(path), str(tmp_path / "out" / "manifest.jsonl")
    summary = prepare_data(cfg, qwen_tokenizer)
    assert summary.kept == 2 and summary.kept_unknown_resolution == 2
    assert "kept 2 with no resolution field" in summary.format() and "resolved_only=auto" in summary.format()


def test_auto_still_filters_rows_that_carry_a_resolution(tmp_path):
    rows = [swe_rebench_row("a", resolved=1), swe_rebench_row("b", resolved=0), swe_zero_row("c"),
            swe_agent_published_row(target=False), swe_agent_published_row(target=True)]
    rows[4]["instance_id"] = "acme__widgets-15"
    kept, report = load_trajectories(DataConfig(source=str(write_jsonl(tmp_path / "m.jsonl", rows))))
    assert [t.id.split(":")[0] for t in kept] == ["a", "c", "acme__widgets-15"]
    assert report.counts == {"unresolved": 2} and report.kept_unknown_resolution == 1
    everything, report_all = load_trajectories(DataConfig(source=str(tmp_path / "m.jsonl"), resolved_only=False))
    assert len(everything) == 5 and report_all.dropped == 0


def test_swe_agent_published_row():
    t = parse_row(swe_agent_published_row(), "a.jsonl:1")
    assert t.schema == "swe-agent" and t.resolved is True
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert t.messages[0]["content"] == "SETTING: You are an autonomous programmer."
    assert t.id.startswith("acme__widgets-14:swe-agent-llama-70b:")


# ---------------------------------------------------------------------------------------------
# SWE-agent .traj folders


def traj_function_calling() -> dict:
    """SWE-agent 1.x, function-calling layout."""
    return {
        "environment": "main",
        "trajectory": [{"action": "ls", "observation": "w.py", "response": "Looking.", "thought": "Looking.",
                        "execution_time": 0.1, "state": {"open_file": "n/a"}, "query": [], "extra_info": {}}],
        "history": [
            {"role": "system", "content": "You are a helpful assistant that can interact with a computer.",
             "agent": "main", "message_type": "system_prompt"},
            {"role": "user", "content": [{"type": "text", "text": "<uploaded_files>\n/testbed\n</uploaded_files>\n"
                                          "Fix parse()."}], "agent": "main", "message_type": "observation"},
            {"role": "assistant", "content": "Let me look at the code.", "thought": "Let me look at the code.",
             "action": "ls /testbed", "agent": "main", "message_type": "action",
             "tool_calls": [{"function": {"arguments": "{\"command\":\"ls /testbed\"}", "name": "bash"},
                             "id": "call_1", "type": "function"}]},
            {"role": "tool", "content": [{"type": "text", "text": "OBSERVATION:\nw.py"}], "agent": "main",
             "message_type": "observation", "tool_call_ids": ["call_1"]},
            {"role": "assistant", "content": "", "thought": "", "action": "submit", "agent": "main",
             "message_type": "action", "tool_calls": [{"function": {"arguments": "{}", "name": "submit"},
                                                       "id": "call_2", "type": "function"}]},
            {"role": "tool", "content": "diff --git a/w.py b/w.py", "agent": "main", "message_type": "observation",
             "tool_call_ids": ["call_2"]},
        ],
        "info": {"swe_agent_version": "1.0.1", "exit_status": "submitted", "submission": "diff --git a/w.py b/w.py",
                 "model_stats": {"api_calls": 2}},
        "replay_config": json.dumps({"agent": {"model": {"name": "claude-sonnet-4"}}}),
    }  # fmt: skip


def traj_older_layout() -> dict:
    """The older layout: no tool_calls, the action inside the assistant's text, two user turns back to back."""
    return {
        "environment": "swe_main", "trajectory": [],
        "history": [
            {"role": "system", "content": "SETTING: You are an autonomous programmer.", "agent": "primary"},
            {"role": "user", "content": "Here is a demonstration of how to solve a task.", "agent": "primary",
             "is_demo": True},
            {"role": "user", "content": "We're currently solving the following issue: parse() crashes.",
             "agent": "primary"},
            {"role": "assistant", "content": "DISCUSSION\nLet me look.\n```\nls\n```", "thought": "Let me look.",
             "action": "ls\n", "agent": "primary"},
            {"role": "user", "content": "w.py\n(Open file: n/a)\nbash-$", "agent": "primary"},
        ],
        "info": {"exit_status": "submitted"},
    }  # fmt: skip


def test_traj_folder_with_a_results_file(tmp_path, qwen_tokenizer):
    run = tmp_path / "run"
    for instance, traj in [("acme__w-1", traj_function_calling()), ("acme__w-2", traj_older_layout()),
                           ("acme__w-3", traj_function_calling())]:
        (run / instance).mkdir(parents=True)
        (run / instance / f"{instance}.traj").write_text(json.dumps(traj))
    (run / "preds.json").write_text(json.dumps({"acme__w-1": {"model_patch": "diff"}}))  # not a trajectory file
    (run / "acme__w-4").mkdir()
    (run / "acme__w-4" / "acme__w-4.traj").write_text('{"history": [')
    report_file = tmp_path / "report.json"
    report_file.write_text(json.dumps({"resolved_ids": ["acme__w-1"], "unresolved_ids": ["acme__w-3"],
                                       "completed_ids": ["acme__w-1", "acme__w-3"]}))  # fmt: skip

    kept, report = load_trajectories(DataConfig(source=str(run), results_file=str(report_file)))
    assert [(t.instance_id, t.resolved, t.schema) for t in kept] == [
        ("acme__w-1", True, "swe-agent-traj"), ("acme__w-2", None, "swe-agent-traj")]
    assert report.counts == {"unresolved": 1, "malformed": 1} and report.kept_unknown_resolution == 1
    assert report.examples["malformed"][0][0].endswith("acme__w-4.traj")
    fc, old = kept
    assert fc.id.startswith("acme__w-1:claude-sonnet-4:") and old.id.startswith("acme__w-2:swe-agent:")
    assert [m["role"] for m in fc.messages] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert fc.messages[1]["content"].endswith("Fix parse().")
    assert fc.messages[2]["tool_calls"] == [{"type": "function", "function": {"name": "bash",
                                                                              "arguments": {"command": "ls /testbed"}}}]
    assert fc.messages[3] == {"role": "tool", "content": "OBSERVATION:\nw.py", "tool_call_id": "call_1"}
    assert [m["role"] for m in old.messages] == ["system", "user", "user", "assistant", "user"]
    for t in kept:  # both render, with the assistant's turns masked
        sample = render_trajectory(t, qwen_tokenizer, DataConfig())
        assert 0 < sample.loss_mask.sum() < len(sample.loss_mask)
    written = qwen_tokenizer.decode(render_trajectory(fc, qwen_tokenizer, DataConfig()).input_ids[
        render_trajectory(fc, qwen_tokenizer, DataConfig()).loss_mask].tolist())
    assert "<function=bash>\n<parameter=command>\nls /testbed\n</parameter>" in written

    # Without a results file every .traj is of unknown resolution: kept under auto, dropped under true.
    kept_all, report_all = load_trajectories(DataConfig(source=str(run)))
    assert len(kept_all) == 3 and report_all.kept_unknown_resolution == 3
    strict, _ = load_trajectories(DataConfig(source=str(run), resolved_only=True))
    assert strict == []


def test_bad_results_files_are_user_errors(tmp_path):
    from common.errors import UserError

    (tmp_path / "a.traj").write_text(json.dumps(traj_older_layout()))
    with pytest.raises(UserError, match="results_file .*not found"):
        load_trajectories(DataConfig(source=str(tmp_path), results_file=str(tmp_path / "none.json")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"resolved": ["a"]}))
    with pytest.raises(UserError, match="resolved_ids"):
        load_trajectories(DataConfig(source=str(tmp_path), results_file=str(bad)))


# ---------------------------------------------------------------------------------------------
# A run that keeps nothing says why


def test_nothing_kept_lists_the_first_examples_of_each_reason(tmp_path, qwen_tokenizer):
    rows = [swe_rebench_row("a", resolved=0), swe_rebench_row("b", resolved=7), swe_zero_row("c")]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    cfg = RunConfig()
    cfg.data.source, cfg.data.resolved_only, cfg.manifest = str(path), True, str(tmp_path / "m.jsonl")
    with pytest.raises(NothingKept) as caught:
        prepare_data(cfg, qwen_tokenizer)
    drops = "\n".join(caught.value.drops)
    assert "dropped 1 x unresolved" in drops and f"{path}:1: a" in drops
    assert "dropped 1 x malformed" in drops and f"{path}:2: field 'resolved'" in drops
    assert "dropped 1 x resolution_unknown" in drops and f"{path}:3" in drops

    from hyperdistill.cli import main

    result = CliRunner().invoke(main, ["prepare-data", "--set", f"data.source={path}", "--set", "data.resolved_only=true",
                                       "--set", f"manifest={tmp_path / 'cli' / 'm.jsonl'}"])  # fmt: skip
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: data.source") and "no trajectory kept out of 3 rows" in lines[-1]
    assert "dropped 1 x malformed" in result.output and f"{path}:2: field 'resolved'" in result.output


def test_copies_are_not_mutated_by_parsing():
    row = swe_rebench_row()
    before = copy.deepcopy(row)
    parse_row(row, "x")
    assert row == before
    with pytest.raises(MalformedRow):
        parse_row({"instance_id": "x", "_hd_instance_id": "x", "history": "not a list"}, "x")
