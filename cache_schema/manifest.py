"""prepare-data's manifest: the one reader every stage uses.

The manifest is JSONL, one line per kept sample in input order, written by `common.manifest.prepare_data`:
    {"id", "instance_id", "location", "n_tokens", "n_assistant_tokens", "n_prompt_tokens",
     "shard", "heldout", "truncated"}
`shard` is the cache part the sample belongs to, `heldout` whether stage 2 keeps it out of training. Its
sha256 is the dataset fingerprint recorded in the cache and in the rendered samples (`dataset_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.errors import UserError

MANIFEST_FIELDS = (
    "id", "instance_id", "location", "n_tokens", "n_assistant_tokens", "n_prompt_tokens",
    "shard", "heldout", "truncated",
)  # fmt: skip
# What a line needs at the least (`cache verify --manifest` accepts such minimal listings).
ID_FIELDS = ("id", "shard")


def _missing(path: Path) -> UserError:
    return UserError(f"manifest {path}: not found (run prepare-data first)")


def load_manifest(path: str | Path, required: tuple[str, ...] = MANIFEST_FIELDS) -> list[dict]:
    """Every line of the manifest as a dict, in order; `sample_id` is read as `id`. UserError naming the
    file and line for a line that is not JSON, lacks a `required` field, or has an id that is not a string
    or a shard that is not an integer."""
    p = Path(path)
    if not p.is_file():
        raise _missing(p)
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"manifest {p}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"manifest {p}:{lineno}: expected a JSON object (line {lineno})")
            if "id" not in row and "sample_id" in row:
                row["id"] = row.pop("sample_id")
            missing = [k for k in required if k not in row]
            if missing:
                raise UserError(f"manifest {p}:{lineno}: missing field(s) {', '.join(missing)} (line {lineno})")
            sid, shard = row.get("id"), row.get("shard")
            if ("id" in row and not isinstance(sid, str)) or (
                "shard" in row and (not isinstance(shard, int) or isinstance(shard, bool))
            ):
                raise UserError(f"manifest {p}:{lineno}: needs a string 'id' and an integer 'shard' (line {lineno})")
            rows.append(row)
    return rows


def load_manifest_ids(path: str | Path) -> dict[int, list[str]]:
    """Sample ids by shard, in manifest order (lines need only 'id' (or 'sample_id') and 'shard')."""
    ids: dict[int, list[str]] = {}
    for row in load_manifest(path, required=ID_FIELDS):
        ids.setdefault(row["shard"], []).append(row["id"])
    return ids


def heldout_ids(path: str | Path) -> dict[str, bool]:
    """Sample id -> held out of training, as prepare-data decided it."""
    return {row["id"]: bool(row["heldout"]) for row in load_manifest(path, required=("id", "shard", "heldout"))}


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 of the manifest's bytes: equal iff the same samples, lengths and shards were prepared."""
    p = Path(path)
    if not p.is_file():
        raise _missing(p)
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def summary_path(manifest_path: str | Path) -> Path:
    """runs/demo/manifest.jsonl -> runs/demo/manifest.summary.json"""
    p = Path(manifest_path)
    return p.with_name(p.stem + ".summary.json")


def rendered_path(manifest_path: str | Path) -> Path:
    """runs/demo/manifest.jsonl -> runs/demo/manifest.rendered.zarr: the rendered samples, one part per shard."""
    p = Path(manifest_path)
    return p.with_name(p.stem + ".rendered.zarr")
