"""Agent trajectories: read rows from any supported source, detect their schema, normalise them.

Three layouts (as described by the datasets' cards on the Hugging Face Hub, and SWE-agent's own files):
- 'openai'   (nebius/SWE-rebench-openhands-trajectories, nvidia/SWE-Zero-openhands-trajectories):
  trajectory_id, instance_id, trajectory = OpenAI-style messages, tools = function schemas, resolved.
  As published: `resolved` is int64 0/1 (SWE-rebench) or absent with no `tools` column (SWE-Zero, whose
  runs are execution-free); every message carries every key of the union (null where unused);
  tool-call arguments are JSON strings; `tools` is in Arrow's union form (each tool's parameters list every
  property name any tool uses, most of them null). Nulls are dropped, unknown columns ignored.
- 'swe-agent' (nebius/SWE-agent-trajectories): instance_id, model_name, target (= resolved),
  trajectory = [{role: system|user|ai, text, ...}]; no id, so one is derived from the content.
- 'swe-agent-traj': a SWE-agent 1.x `.traj` file (what users running SWE-agent have on disk): top-level
  `history` of messages {role, content, tool_calls (arguments as JSON strings), tool_call_ids, ...}; the
  instance id is the file's name; the resolution comes from a SWE-bench report (`data.results_file`).

Every row either becomes a `Trajectory` (messages in OpenAI style, tool-call arguments as dicts) or
is counted in the `DropReport` with its location and reason: nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import DataConfig
from common.errors import UserError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".traj")
# Rows per Parquet record batch: local Parquet is read in order, a batch at a time, never whole.
PARQUET_BATCH_ROWS = 64
ROLES = ("system", "user", "assistant", "tool")
# How many example locations each drop reason keeps for the report.
MAX_EXAMPLES = 5
# Keys `_iter_traj` adds to a .traj file's object: the instance id (its file name) and the resolution from
# the results file. Prefixed so that no field of SWE-agent's own can collide with them.
TRAJ_INSTANCE = "_hd_instance_id"
TRAJ_RESOLVED = "_hd_resolved"


@dataclass(frozen=True)
class Trajectory:
    id: str
    instance_id: str
    resolved: bool | None
    messages: list[dict]
    tools: list[dict]
    schema: str  # 'openai' | 'swe-agent' | 'swe-agent-traj'
    location: str  # 'file:line' or 'hf://owner/name[row]', for messages that point at the row


_SWE_INSTANCE = re.compile(r"^(?P<owner>.+?)__(?P<name>.+)-\d+$")


def repository_of(instance_id: str) -> str | None:
    """'owner/name' from a SWE-bench-style instance id 'owner__name-NUMBER' (SWE-bench's dataset card: "formatted
    as repo_owner__repo_name-PR-number"; SWE-Gym and SWE-rebench ids have the same form), else None."""
    m = _SWE_INSTANCE.match(instance_id)
    return f"{m['owner']}/{m['name']}" if m else None


@dataclass
class DropReport:
    """Rows read, and for each drop reason its count and the first few (location, detail) examples."""

    rows_read: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    kept_unknown_resolution: int = 0
    """Rows kept although they carry no resolution (data.resolved_only: auto, or false)."""

    def add(self, reason: str, location: str, detail: str = "") -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append((location, detail))

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())


class MalformedRow(Exception):
    """A row that cannot be read as a trajectory; `field` names the offending field."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"field '{field_name}': {reason}")
        self.field = field_name


# ---------------------------------------------------------------------------------------------
# Sources -> (location, raw row) pairs


def _iter_jsonl(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    """One row per non-blank line; a line that is not JSON yields a MalformedRow in place of the row,
    so the caller reports it as file:line and keeps going."""
    with path.open("rb") as f:  # bytes, so one line that is not UTF-8 is one malformed row
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            row: Any
            try:
                row = json.loads(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as e:
                row = MalformedRow("<line>", f"not UTF-8 (byte {e.start})")
            except json.JSONDecodeError as e:
                row = MalformedRow("<line>", f"not valid JSON ({e.msg}: column {e.colno})")
            yield f"{shown}:{lineno}", row


def _iter_json(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of trajectory rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"{shown}[{i}]", row


def _iter_dataset(dataset: Iterable[dict], name: str) -> Iterator[tuple[str, Any]]:
    """Rows of a `datasets` (iterable) dataset, in order."""
    for i, row in enumerate(dataset):
        yield f"{name}[{i}]", row


def _iter_parquet(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    """Rows in file order, one record batch at a time (a Parquet file of 67k trajectories is tens of GB
    as Python objects). Arrow's `to_pylist` gives the rows the hub's Arrow-backed datasets give."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{shown}[{i}]", row
                i += 1
    except Exception as e:  # pyarrow raises several types for unreadable files (also mid-file)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable Parquet file ({reason})") from None


def _iter_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    """A hub dataset streamed (`streaming=True`: rows arrive as they are downloaded, never all in memory)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # network, auth, missing split: all user-facing
        reason = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"hf://{name} (split {split!r}): could not load ({type(e).__name__}: {reason})") from None
    yield from _iter_dataset(dataset, f"hf://{name}")


def load_results(path: str | None) -> dict[str, bool]:
    """instance id -> resolved, from a SWE-bench evaluation report (the harness's or sb-cli's JSON):
    ids in `resolved_ids` are resolved; ids in any other `*_ids` list (unresolved, error, empty patch...)
    are not. Instances in no list stay unknown. {} without a file."""
    if path is None:
        return {}
    p = Path(path)
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"data.results_file {p}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"data.results_file {p}: not valid JSON ({e})") from None
    lists = {k: v for k, v in report.items() if k.endswith("_ids")} if isinstance(report, dict) else {}
    if "resolved_ids" not in lists or not all(isinstance(v, list) for v in lists.values()):
        raise UserError(f"data.results_file {p}: expected a SWE-bench report with a 'resolved_ids' list")
    out = {str(i): False for key, ids in lists.items() if key != "resolved_ids" for i in ids}
    out.update({str(i): True for i in lists["resolved_ids"]})
    return out


def _iter_traj(path: Path, shown: str, results: dict[str, bool]) -> Iterator[tuple[str, Any]]:
    """One SWE-agent `.traj` file = one row. SWE-agent names it `<instance_id>.traj`; the row gets that id and
    the resolution the results file gives it (None when there is none)."""
    row: Any
    try:
        row = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        row = MalformedRow("<file>", f"not UTF-8 (byte {e.start})")
    except json.JSONDecodeError as e:
        row = MalformedRow("<file>", f"not valid JSON ({e.msg}: line {e.lineno})")
    if isinstance(row, dict):
        row = {**row, TRAJ_INSTANCE: path.stem, TRAJ_RESOLVED: results.get(path.stem)}
    yield shown, row


def _unknown_extension(path: Path) -> UserError:
    expected = ", ".join(DATA_SUFFIXES)
    return UserError(f"{path}: unknown data file extension {path.suffix!r} (expected one of {expected})")


def _iter_file(path: Path, shown: str, results: dict[str, bool]) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        return _iter_jsonl(path, shown)
    if path.suffix == ".json":
        return _iter_json(path, shown)
    if path.suffix == ".parquet":
        return _iter_parquet(path, shown)
    if path.suffix == ".traj":
        return _iter_traj(path, shown, results)
    raise _unknown_extension(path)


def resolve_source(source: str) -> list[Path] | str:
    """The data files a source names (sorted), or the hub id for 'hf://OWNER/NAME'.

    Paths keep the form the source gave (relative stays relative); 'testbed:SPLIT' to the task-family
    testbed's file (common.testbed, written on first use); 'sample' resolves to the bundled folder, which `_shown` names relative to the repository so locations do not depend on the checkout.
    """
    if source.startswith("hf://"):
        name = source[len("hf://") :].strip("/")
        if name.count("/") != 1:
            raise UserError(f"data.source {source!r}: expected hf://OWNER/NAME")
        return name
    if source.startswith("testbed:"):
        from common.testbed import SPLITS, split_file

        split = source[len("testbed:") :]
        if split not in SPLITS:
            raise UserError(f"data.source {source!r}: expected testbed:SPLIT with SPLIT one of {', '.join(SPLITS)}")
        return [split_file(split)]
    path = SAMPLE_DIR if source == "sample" else Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder holds no {'/'.join(DATA_SUFFIXES)} files")
        trajs = [p for p in files if p.suffix == ".traj"]
        # A SWE-agent output folder also holds preds.json and other run files: read only its .traj files.
        return trajs or files
    if not path.is_file():
        raise UserError(f"data.source {path}: no such file or folder")
    if path.suffix not in DATA_SUFFIXES:
        raise _unknown_extension(path)
    return [path]


def _shown(path: Path) -> str:
    """How a location names a file: the bundled sample as data/sample/NAME, anything else as given."""
    if path.is_relative_to(SAMPLE_DIR):
        return str(path.relative_to(SAMPLE_DIR.parent.parent))
    return str(path)


def iter_rows(data_cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    """(location, raw row) for every row of the source, in input order."""
    resolved = resolve_source(data_cfg.source)
    if isinstance(resolved, str):
        yield from _iter_hub(resolved, data_cfg.split)
        return
    results = load_results(data_cfg.results_file)
    for path in resolved:
        yield from _iter_file(path, _shown(path), results)


# ---------------------------------------------------------------------------------------------
# Schema detection and normalisation


def _maybe_json(value: Any, field_name: str) -> Any:
    """Hub and Parquet copies sometimes store nested fields as JSON strings: accept both forms."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise MalformedRow(field_name, f"not valid JSON ({e.msg}: char {e.pos})") from None
    return value


def _drop_nones(value: Any) -> Any:
    """Arrow-backed rows give every struct the union of all keys, absent ones as None: remove them."""
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nones(v) for v in value]
    return value


def detect_schema(row: Any) -> str:
    """'openai', 'swe-agent' or 'swe-agent-traj', from the row's fields; MalformedRow for an unknown layout."""
    if not isinstance(row, dict):
        raise MalformedRow("<row>", f"expected a JSON object, got {type(row).__name__}")
    if TRAJ_INSTANCE in row:
        if not isinstance(row.get("history"), list):
            raise MalformedRow("history", f"unknown layout: a .traj file needs a 'history' list (fields: "
                               f"{sorted(k for k in row if not k.startswith('_hd_'))})")
        return "swe-agent-traj"
    messages = _maybe_json(row.get("trajectory"), "trajectory")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise MalformedRow(
            "trajectory", f"unknown layout: expected a non-empty list of messages (row fields: {sorted(row)})"
        )
    keys = set().union(*(m.keys() for m in messages))
    if "content" in keys or "tool_calls" in keys:
        return "openai"
    if "text" in keys:
        return "swe-agent"
    raise MalformedRow(
        "trajectory", f"unknown layout: messages have neither 'content' nor 'text' (keys: {sorted(keys)})"
    )


def _require_str(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedRow(key, "missing" if value is None else f"expected a non-empty string, got {value!r:.40}")
    return value


def _resolution(row: dict, key: str) -> bool | None:
    """A resolution flag: true/false, or 0/1 as SWE-rebench publishes it (int64); None when absent."""
    value = row.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise MalformedRow(key, f"expected true/false or 0/1, got {value!r:.40}")


def _text(value: Any, field_name: str) -> str:
    """Message content as one string: None -> '', a list of text parts -> their concatenation."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise MalformedRow(field_name, f"expected a string, got {type(value).__name__}")


def _tool_calls(value: Any, where: str) -> list[dict]:
    calls = _maybe_json(value, where)
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise MalformedRow(where, f"expected a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise MalformedRow(f"{where}[{j}].function", "missing")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise MalformedRow(f"{where}[{j}].function.name", "missing")
        args = fn.get("arguments")
        if args is None or args == "":
            args = {}
        args = _maybe_json(args, f"{where}[{j}].function.arguments")
        if not isinstance(args, dict):
            raise MalformedRow(f"{where}[{j}].function.arguments", f"expected a JSON object, got {type(args).__name__}")
        out.append({"type": "function", "function": {"name": name, "arguments": args}})
    return out


def _openai_messages(raw: list[dict], where: str = "trajectory") -> list[dict]:
    """OpenAI-style messages, normalised: content a string ('' for null), tool calls only where there are
    some (null and [] are the same), name / tool_call_id kept on tool messages when they are strings."""
    messages = []
    for i, m in enumerate(raw):
        role = m.get("role")
        if role not in ROLES:
            raise MalformedRow(f"{where}[{i}].role", f"{role!r} is not one of {list(ROLES)}")
        msg: dict[str, Any] = {"role": role, "content": _text(m.get("content"), f"{where}[{i}].content")}
        if role == "assistant":
            calls = _tool_calls(m.get("tool_calls"), f"{where}[{i}].tool_calls")
            if calls:
                msg["tool_calls"] = calls
        elif role == "tool":
            ids = m.get("tool_call_ids")  # SWE-agent's spelling: a list
            if m.get("tool_call_id") is None and isinstance(ids, list) and ids and isinstance(ids[0], str):
                m = {**m, "tool_call_id": ids[0]}
            for key in ("name", "tool_call_id"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        messages.append(msg)
    return messages


def _openai_row(row: dict, location: str) -> Trajectory:
    traj_id = _require_str(row, "trajectory_id")
    instance_id = _require_str(row, "instance_id")
    messages = _openai_messages(_maybe_json(row["trajectory"], "trajectory"))
    # Arrow's union form: every tool lists every property name any tool has, null where it has none, and
    # nulls for keys such as additionalProperties / enum: dropping nulls gives each tool its own schema.
    tools = _drop_nones(_maybe_json(row.get("tools"), "tools")) or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise MalformedRow("tools", "expected a list of function schemas")
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise MalformedRow(f"tools[{k}].function.name", "missing")
        if "parameters" in fn:
            fn["parameters"] = _drop_nones(_maybe_json(fn["parameters"], f"tools[{k}].function.parameters"))
    return Trajectory(
        id=traj_id,
        instance_id=instance_id,
        resolved=_resolution(row, "resolved"),
        messages=messages,
        tools=tools,
        schema="openai",
        location=location,
    )


_SWE_AGENT_ROLES = {"system": "system", "user": "user", "ai": "assistant", "assistant": "assistant"}


def _swe_agent_row(row: dict, location: str) -> Trajectory:
    instance_id = _require_str(row, "instance_id")
    model_name = row.get("model_name") or "unknown-model"
    if "target" not in row:
        raise MalformedRow("target", "missing")
    resolved = _resolution(row, "target")
    messages = []
    for i, m in enumerate(_maybe_json(row["trajectory"], "trajectory")):
        role = _SWE_AGENT_ROLES.get(m.get("role"))
        if role is None:
            raise MalformedRow(f"trajectory[{i}].role", f"{m.get('role')!r} is not one of {sorted(_SWE_AGENT_ROLES)}")
        text = _text(m.get("text"), f"trajectory[{i}].text")
        if role == "system" and not text:
            text = _text(m.get("system_prompt"), f"trajectory[{i}].system_prompt")
        messages.append({"role": role, "content": text})
    # No id in this layout: derive one from what identifies the run (instance, model, exact text).
    digest = hashlib.sha1("\x00".join(m["content"] for m in messages).encode()).hexdigest()[:8]
    return Trajectory(
        id=f"{instance_id}:{model_name}:{digest}",
        instance_id=instance_id,
        resolved=resolved,
        messages=messages,
        tools=[],
        schema="swe-agent",
        location=location,
    )


def _traj_model(row: dict) -> str:
    """The model a .traj was run with, from its replay_config (a JSON string in SWE-agent 1.x), if it says."""
    try:
        config = _maybe_json(row.get("replay_config"), "replay_config")
        name = config["agent"]["model"]["name"]
    except (MalformedRow, KeyError, TypeError):
        return "swe-agent"
    return name if isinstance(name, str) and name else "swe-agent"


def _traj_row(row: dict, location: str) -> Trajectory:
    """A SWE-agent 1.x .traj file: `history` holds the conversation as the model saw it (the function-calling
    layout has tool_calls with JSON-string arguments and tool messages with tool_call_ids; the older one has
    plain text turns). No tools column: the tools are described in the system prompt."""
    instance_id = row[TRAJ_INSTANCE]
    history = row["history"]
    if not history or not all(isinstance(m, dict) for m in history):
        raise MalformedRow("history", "expected a non-empty list of messages")
    messages = _openai_messages(history, "history")
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:8]
    return Trajectory(
        id=f"{instance_id}:{_traj_model(row)}:{digest}",
        instance_id=instance_id,
        resolved=row.get(TRAJ_RESOLVED),
        messages=messages,
        tools=[],
        schema="swe-agent-traj",
        location=location,
    )


_PARSERS = {"openai": _openai_row, "swe-agent": _swe_agent_row, "swe-agent-traj": _traj_row}


def parse_row(row: Any, location: str) -> Trajectory:
    """One raw row -> Trajectory; raises MalformedRow naming the field."""
    if isinstance(row, MalformedRow):
        raise row
    return _PARSERS[detect_schema(row)](row, location)


# ---------------------------------------------------------------------------------------------
# Loading with filters


def iter_trajectories(data_cfg: DataConfig, report: DropReport) -> Iterator[Trajectory]:
    """The usable trajectories of the source, streamed in input order; every dropped row goes to `report`.

    Drop reasons: malformed, unresolved, resolution_unknown (data.resolved_only: true only),
    excluded_instance, duplicate_id (the first row with an id wins). With resolved_only 'auto' (the
    default) rows that carry a resolution are filtered by it and rows without one (execution-free runs
    such as SWE-Zero's, .traj files without a results file) are kept and counted as kept_unknown_resolution.
    """
    excluded = set(data_cfg.exclude_instances)
    seen: set[str] = set()
    for location, row in iter_rows(data_cfg):
        report.rows_read += 1
        try:
            traj = parse_row(row, location)
        except MalformedRow as e:
            report.add("malformed", location, str(e))
            continue
        if traj.resolved is None and data_cfg.resolved_only is True:
            report.add("resolution_unknown", location, f"{traj.id}: no resolved/target field")
        elif traj.resolved is False and data_cfg.resolved_only in (True, "auto"):
            report.add("unresolved", location, traj.id)
        elif traj.instance_id in excluded:
            report.add("excluded_instance", location, traj.instance_id)
        elif traj.id in seen:
            report.add("duplicate_id", location, traj.id)
        else:
            seen.add(traj.id)
            report.kept_unknown_resolution += traj.resolved is None
            yield traj


def load_trajectories(data_cfg: DataConfig) -> tuple[list[Trajectory], DropReport]:
    """All usable trajectories of the source, in input order, and a report of every dropped row
    (`iter_trajectories` held in a list: for small sources and tests)."""
    report = DropReport()
    kept = list(iter_trajectories(data_cfg, report))
    return kept, report
