"""Agent trajectories: read rows from any supported source, detect their schema, normalise them.

Two real layouts (as described by the datasets' cards on the Hugging Face Hub):
- 'openai'   (nebius/SWE-rebench-openhands-trajectories, nvidia/SWE-Zero-openhands-trajectories):
  trajectory_id, instance_id, trajectory = OpenAI-style messages, tools = function schemas, resolved.
- 'swe-agent' (nebius/SWE-agent-trajectories): instance_id, model_name, target (= resolved),
  trajectory = [{role: system|user|ai, text, ...}]; no id, so one is derived from the content.

Every row either becomes a `Trajectory` (messages in OpenAI style, tool-call arguments as dicts) or
is counted in the `DropReport` with its location and reason: nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import DataConfig
from common.errors import UserError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
# How many example locations each drop reason keeps for the report.
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Trajectory:
    id: str
    instance_id: str
    resolved: bool | None
    messages: list[dict]
    tools: list[dict]
    schema: str  # 'openai' | 'swe-agent'
    location: str  # 'file:line' or 'hf://owner/name[row]', for messages that point at the row


@dataclass
class DropReport:
    """Rows read, and for each drop reason its count and the first few (location, detail) examples."""

    rows_read: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

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
    """Rows of a `datasets.Dataset`: the hub path and local Parquet share this code."""
    for i, row in enumerate(dataset):
        yield f"{name}[{i}]", row


def _iter_parquet(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    import datasets
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable Parquet file ({reason})") from None
    # An in-memory Dataset (no cache files written) so rows come out exactly as from the hub.
    yield from _iter_dataset(datasets.Dataset(table), shown)


def _iter_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, missing split: all user-facing
        reason = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"hf://{name} (split {split!r}): could not load ({type(e).__name__}: {reason})") from None
    yield from _iter_dataset(dataset, f"hf://{name}")


def _unknown_extension(path: Path) -> UserError:
    expected = ", ".join(DATA_SUFFIXES)
    return UserError(f"{path}: unknown data file extension {path.suffix!r} (expected one of {expected})")


def _iter_file(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        return _iter_jsonl(path, shown)
    if path.suffix == ".json":
        return _iter_json(path, shown)
    if path.suffix == ".parquet":
        return _iter_parquet(path, shown)
    raise _unknown_extension(path)


def resolve_source(source: str) -> list[Path] | str:
    """The data files a source names (sorted), or the hub id for 'hf://OWNER/NAME'.

    Paths keep the form the source gave (relative stays relative); 'sample' resolves to the bundled
    folder, which `_shown` names relative to the repository so locations do not depend on the checkout.
    """
    if source.startswith("hf://"):
        name = source[len("hf://") :].strip("/")
        if name.count("/") != 1:
            raise UserError(f"data.source {source!r}: expected hf://OWNER/NAME")
        return name
    path = SAMPLE_DIR if source == "sample" else Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder holds no {'/'.join(DATA_SUFFIXES)} files")
        return files
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
    for path in resolved:
        yield from _iter_file(path, _shown(path))


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
    """'openai' or 'swe-agent', from the row's fields; MalformedRow for an unknown layout."""
    if not isinstance(row, dict):
        raise MalformedRow("<row>", f"expected a JSON object, got {type(row).__name__}")
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


def _optional_bool(row: dict, key: str) -> bool | None:
    value = row.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise MalformedRow(key, f"expected true/false, got {value!r:.40}")


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


def _openai_messages(raw: list[dict]) -> list[dict]:
    messages = []
    for i, m in enumerate(raw):
        role = m.get("role")
        if role not in ROLES:
            raise MalformedRow(f"trajectory[{i}].role", f"{role!r} is not one of {list(ROLES)}")
        msg: dict[str, Any] = {"role": role, "content": _text(m.get("content"), f"trajectory[{i}].content")}
        if role == "assistant":
            calls = _tool_calls(m.get("tool_calls"), f"trajectory[{i}].tool_calls")
            if calls:
                msg["tool_calls"] = calls
        elif role == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        messages.append(msg)
    return messages


def _openai_row(row: dict, location: str) -> Trajectory:
    traj_id = _require_str(row, "trajectory_id")
    instance_id = _require_str(row, "instance_id")
    messages = _openai_messages(_maybe_json(row["trajectory"], "trajectory"))
    tools = _drop_nones(_maybe_json(row.get("tools"), "tools")) or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise MalformedRow("tools", "expected a list of function schemas")
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise MalformedRow(f"tools[{k}].function.name", "missing")
        if "parameters" in fn:
            fn["parameters"] = _maybe_json(fn["parameters"], f"tools[{k}].function.parameters")
    return Trajectory(
        id=traj_id,
        instance_id=instance_id,
        resolved=_optional_bool(row, "resolved"),
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
    resolved = _optional_bool(row, "target")
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


def parse_row(row: Any, location: str) -> Trajectory:
    """One raw row -> Trajectory; raises MalformedRow naming the field."""
    if isinstance(row, MalformedRow):
        raise row
    schema = detect_schema(row)
    return _openai_row(row, location) if schema == "openai" else _swe_agent_row(row, location)


# ---------------------------------------------------------------------------------------------
# Loading with filters


def load_trajectories(data_cfg: DataConfig) -> tuple[list[Trajectory], DropReport]:
    """All usable trajectories of the source, in input order, and a report of every dropped row.

    Drop reasons: malformed, unresolved, resolution_unknown (both only with resolved_only),
    excluded_instance, duplicate_id (the first row with an id wins).
    """
    report = DropReport()
    excluded = set(data_cfg.exclude_instances)
    seen: set[str] = set()
    kept: list[Trajectory] = []
    for location, row in iter_rows(data_cfg):
        report.rows_read += 1
        try:
            traj = parse_row(row, location)
        except MalformedRow as e:
            report.add("malformed", location, str(e))
            continue
        if data_cfg.resolved_only and traj.resolved is None:
            report.add("resolution_unknown", location, f"{traj.id}: no resolved/target field")
        elif data_cfg.resolved_only and not traj.resolved:
            report.add("unresolved", location, traj.id)
        elif traj.instance_id in excluded:
            report.add("excluded_instance", location, traj.instance_id)
        elif traj.id in seen:
            report.add("duplicate_id", location, traj.id)
        else:
            seen.add(traj.id)
            kept.append(traj)
    return kept, report
