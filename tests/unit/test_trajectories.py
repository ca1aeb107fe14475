"""Trajectory loading: schema detection, normalisation, malformed rows, filters, sources."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import DataConfig
from common.errors import UserError
from common.trajectories import SAMPLE_DIR, MalformedRow, detect_schema, load_trajectories, parse_row


def openai_row(traj_id="t1", **over):
    row = {
        "trajectory_id": traj_id,
        "instance_id": "acme__lib-1",
        "repo": "acme/lib",
        "trajectory": [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": "Fix the bug."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
                ],
            },
            {"role": "tool", "content": "a.py", "name": "bash", "tool_call_id": "c1"},
            {"role": "assistant", "content": [{"type": "text", "text": "Done"}, {"type": "text", "text": "."}]},
        ],
        "tools": [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}],
        "resolved": True,
    }
    row.update(over)
    return row


def swe_agent_row(**over):
    row = {
        "instance_id": "acme__lib-2",
        "model_name": "agent-x",
        "target": False,
        "trajectory": [
            {"role": "system", "text": "", "system_prompt": "SETTING: ...", "mask": False},
            {"role": "user", "text": "ISSUE: x", "mask": False},
            {"role": "ai", "text": "Let me look.\n```\nls\n```", "mask": True},
        ],
        "exit_status": "submitted",
    }
    row.update(over)
    return row


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# Schema detection and normalisation


def test_detects_openai_and_normalises():
    assert detect_schema(openai_row()) == "openai"
    t = parse_row(openai_row(), "f.jsonl:1")
    assert (t.id, t.instance_id, t.resolved, t.schema) == ("t1", "acme__lib-1", True, "openai")
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert t.messages[2]["content"] == ""  # None -> ''
    assert t.messages[2]["tool_calls"] == [
        {"type": "function", "function": {"name": "bash", "arguments": {"command": "ls"}}}
    ]
    assert t.messages[4]["content"] == "Done."  # text parts joined
    assert t.tools[0]["function"]["name"] == "bash"


def test_detects_swe_agent_and_derives_a_stable_id():
    row = swe_agent_row()
    assert detect_schema(row) == "swe-agent"
    t = parse_row(row, "g.jsonl:3")
    assert t.schema == "swe-agent" and t.resolved is False and t.tools == []
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant"]  # 'ai' -> assistant
    assert t.messages[0]["content"] == "SETTING: ..."  # empty system text falls back to system_prompt
    prefix = "acme__lib-2:agent-x:"
    assert t.id.startswith(prefix) and len(t.id) == len(prefix) + 8
    assert parse_row(swe_agent_row(), "elsewhere").id == t.id  # content-derived, not location-derived
    other = swe_agent_row(trajectory=[*row["trajectory"][:2], {"role": "assistant", "text": "Other.", "mask": True}])
    assert parse_row(other, "g.jsonl:4").id != t.id


def test_unknown_layout_is_malformed():
    with pytest.raises(MalformedRow, match="unknown layout"):
        detect_schema({"instance_id": "x", "trajectory": [{"role": "user", "value": "hi"}]})
    with pytest.raises(MalformedRow, match="unknown layout"):
        detect_schema({"instance_id": "x", "conversation": []})


# ---------------------------------------------------------------------------------------------
# Malformed rows: every one reported with file:line and the field


def test_every_malformed_row_reported_with_line_and_field(tmp_path, monkeypatch):
    monkeypatch.setattr("common.trajectories.MAX_EXAMPLES", 20)  # the report keeps 5 per reason by default
    bad_args = openai_row("t3")
    bad_args["trajectory"][2]["tool_calls"][0]["function"]["arguments"] = '{"command": "ls'
    list_args = openai_row("t4")
    list_args["trajectory"][2]["tool_calls"][0]["function"]["arguments"] = "[1, 2]"
    bad_role = openai_row("t5")
    bad_role["trajectory"][1]["role"] = "human"
    no_id = openai_row("t6")
    del no_id["trajectory_id"]
    path = write_jsonl(
        tmp_path / "rows.jsonl",  # line 11 (appended below) is not UTF-8
        [
            openai_row("ok1"),  # line 1
            '{"trajectory_id": "t2", "trajectory": [',  # line 2: not JSON
            bad_args,  # 3
            list_args,  # 4
            "",  # 5: blank lines are not rows
            bad_role,  # 6
            no_id,  # 7
            "[1, 2, 3]",  # 8: not an object
            swe_agent_row(target="yes"),  # 9
            swe_agent_row(),  # 10: fine
        ],
    )
    with path.open("ab") as f:
        f.write(b'{"trajectory_id": "caf\xe9"}\n')
    kept, report = load_trajectories(DataConfig(source=str(path), resolved_only=False))
    assert [t.id for t in kept] == ["ok1", parse_row(swe_agent_row(), "x").id]
    assert report.rows_read == 10
    assert report.counts == {"malformed": 8}
    where = {loc.rsplit(":", 1)[1]: detail for loc, detail in report.examples["malformed"]}
    assert all(loc.startswith(f"{path}:") for loc, _ in report.examples["malformed"])
    assert "not valid JSON" in where["2"]
    assert "trajectory[2].tool_calls[0].function.arguments" in where["3"] and "not valid JSON" in where["3"]
    assert "trajectory[2].tool_calls[0].function.arguments" in where["4"] and "JSON object" in where["4"]
    assert "trajectory[1].role" in where["6"]
    assert "'trajectory_id'" in where["7"]
    assert "'<row>'" in where["8"]
    assert "'target'" in where["9"]
    assert "not UTF-8" in where["11"]


def test_bundled_sample_drops_are_all_accounted_for():
    kept, report = load_trajectories(DataConfig(source="sample", resolved_only=False))
    # The sample (written for this project): 18 OpenHands lines, 9 SWE-agent lines; 4 malformed, 1 duplicate.
    assert report.rows_read == 27
    assert report.counts == {"malformed": 4, "duplicate_id": 1}
    assert len(kept) + report.dropped == report.rows_read
    locations = sorted(loc.rsplit("/", 1)[1] for loc, _ in report.examples["malformed"])
    assert locations == ["openhands.jsonl:15", "openhands.jsonl:4", "openhands.jsonl:8", "swe_agent.jsonl:5"]
    details = " ".join(d for _, d in report.examples["malformed"])
    for field_name in ("<line>", "'instance_id'", "function.arguments", "'target'"):
        assert field_name in details
    assert report.examples["duplicate_id"][0][0].endswith("openhands.jsonl:12")
    assert {t.schema for t in kept} == {"openai", "swe-agent"}
    # Locations name the bundled files relative to the repository, whatever the checkout path.
    assert all(t.location.startswith("data/sample/") for t in kept)
    assert len({t.id for t in kept}) == len(kept)


# ---------------------------------------------------------------------------------------------
# Filters


def test_filters_count_each_reason(tmp_path):
    rows = [
        openai_row("a"),
        openai_row("b", resolved=False),
        openai_row("c", instance_id="secret__bench-9"),
        openai_row("a"),  # duplicate of the first
        openai_row("d", resolved=None),
        swe_agent_row(),  # target False
        swe_agent_row(target=True, instance_id="acme__lib-3"),
    ]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    cfg = DataConfig(source=str(path), resolved_only=True, exclude_instances=["secret__bench-9"])
    kept, report = load_trajectories(cfg)
    assert [t.id.split(":")[0] for t in kept] == ["a", "acme__lib-3"]
    assert report.counts == {"unresolved": 2, "excluded_instance": 1, "duplicate_id": 1, "resolution_unknown": 1}
    assert len(kept) + report.dropped == report.rows_read == len(rows)
    assert report.examples["excluded_instance"] == [(f"{path}:3", "secret__bench-9")]

    kept_all, report_all = load_trajectories(DataConfig(source=str(path), resolved_only=False))
    assert len(kept_all) == 6 and report_all.counts == {"duplicate_id": 1}


# ---------------------------------------------------------------------------------------------
# Sources


def _content(t):
    return (t.instance_id, t.resolved, t.schema, t.messages, t.tools)


def test_parquet_gives_the_same_trajectories_as_jsonl(tmp_path):
    kept_jsonl, _ = load_trajectories(DataConfig(source="sample", resolved_only=False))
    for name in ("openhands.jsonl", "swe_agent.jsonl"):
        rows = []
        for lineno, line in enumerate((SAMPLE_DIR / name).read_text().splitlines(), start=1):
            try:
                parse_row(json.loads(line), f"{name}:{lineno}")
            except (json.JSONDecodeError, MalformedRow):
                continue
            rows.append(json.loads(line))
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
    kept_pq, report = load_trajectories(DataConfig(source=str(tmp_path), resolved_only=False))
    assert report.counts == {"duplicate_id": 1}
    assert report.examples["duplicate_id"][0][0].endswith("openhands.jsonl.parquet[9]")
    assert all(".parquet[" in t.location for t in kept_pq)
    # Parquet fills absent struct keys with nulls; after normalisation the trajectories are identical.
    assert {t.id: _content(t) for t in kept_pq} == {t.id: _content(t) for t in kept_jsonl}


def test_hub_source_goes_through_datasets(monkeypatch):
    import datasets

    calls = []

    rows = [openai_row("h0"), openai_row("h1", resolved=False), openai_row("h2")]
    for row in rows:  # Arrow columns need one type: plain-string content everywhere
        row["trajectory"][4]["content"] = "Done."

    def fake_load_dataset(name, split, streaming=False):
        calls.append((name, split, streaming))
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    kept, report = load_trajectories(DataConfig(source="hf://nebius/SWE-rebench-openhands-trajectories", split="train"))
    assert calls == [("nebius/SWE-rebench-openhands-trajectories", "train", True)]  # streamed
    assert [t.id for t in kept] == ["h0", "h2"]
    assert kept[1].location == "hf://nebius/SWE-rebench-openhands-trajectories[2]"
    assert report.examples["unresolved"] == [("hf://nebius/SWE-rebench-openhands-trajectories[1]", "h1")]


def test_bad_sources_name_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match="nope.jsonl"):
        load_trajectories(DataConfig(source=str(missing)))
    odd = tmp_path / "rows.csv"
    odd.write_text("a,b\n")
    with pytest.raises(UserError, match=r"rows\.csv.*unknown data file extension"):
        load_trajectories(DataConfig(source=str(odd)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no"):
        load_trajectories(DataConfig(source=str(empty)))
    with pytest.raises(UserError, match="hf://OWNER/NAME"):
        load_trajectories(DataConfig(source="hf://just-a-name"))
    not_list = tmp_path / "rows.json"
    not_list.write_text('{"rows": []}')
    with pytest.raises(UserError, match=r"rows\.json.*JSON list"):
        load_trajectories(DataConfig(source=str(not_list)))


def test_json_list_source_locations(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([openai_row("j0"), {"instance_id": "x"}]))
    kept, report = load_trajectories(DataConfig(source=str(path)))
    assert [t.location for t in kept] == [f"{path}[0]"]
    assert report.examples["malformed"][0][0] == f"{path}[1]"


def test_swe_agent_id_matches_an_independent_digest():
    row = swe_agent_row()
    texts = ["SETTING: ...", "ISSUE: x", "Let me look.\n```\nls\n```"]
    expected = "acme__lib-2:agent-x:" + hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:8]
    assert parse_row(row, "x").id == expected
