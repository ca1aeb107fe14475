"""prepare-data: load, filter and render every trajectory once; write the manifest and its summary.

The manifest (JSONL, one line per kept sample, in input order) is what the later stages agree on:
stage 1 re-renders one shard at a time with `load_shard_samples` and checks it against the manifest;
its sha256 is the dataset fingerprint recorded in the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.config import RunConfig
from common.errors import UserError
from common.rendering import RenderedSample, SampleRejected, render_trajectory
from common.sharding import is_heldout, shard_of
from common.tokenizer import chat_template_fingerprint, tokenizer_fingerprint
from common.trajectories import load_trajectories

MANIFEST_FIELDS = (
    "id", "instance_id", "location", "n_tokens", "n_assistant_tokens", "n_prompt_tokens",
    "shard", "heldout", "truncated",
)  # fmt: skip


class NothingKept(UserError):
    """No trajectory survived the filters. `drops` lists, as a run that keeps something does, each drop
    reason with its first examples (the CLI prints it before the one-line error)."""

    def __init__(self, message: str, drops: list[str]):
        super().__init__(message)
        self.drops = drops


def format_drops(counts: dict[str, int], examples: dict[str, list[tuple[str, str]]]) -> list[str]:
    """'dropped N x reason' and its first example rows (location: detail), for every reason."""
    lines = []
    for reason, count in sorted(counts.items()):
        lines.append(f"dropped {count} x {reason}")
        lines += [f"    {loc}: {detail}" if detail else f"    {loc}" for loc, detail in examples.get(reason, [])]
    return lines


@dataclass
class PrepareSummary:
    source: str
    rows_read: int
    kept: int
    dropped: dict[str, int]
    drop_examples: dict[str, list[tuple[str, str]]]
    n_tokens: int
    n_assistant_tokens: int
    tokens_min: int
    tokens_mean: float
    tokens_max: int
    per_shard: list[int]
    heldout: int
    truncated: int
    fingerprint: str
    manifest_path: str
    summary_path: str
    kept_unknown_resolution: int = 0
    resolved_only: bool | str = "auto"
    extra: dict = field(default_factory=dict)  # tokenizer / template fingerprints, the data config

    def format(self) -> str:
        """Human-readable report: what was kept, and every drop reason with a few example rows."""
        n_dropped = sum(self.dropped.values())
        frac = self.n_assistant_tokens / self.n_tokens if self.n_tokens else 0.0
        lines = [
            f"source {self.source}: {self.rows_read} rows read, {self.kept} kept, {n_dropped} dropped",
            f"tokens: {self.n_tokens} total, {self.n_assistant_tokens} assistant ({frac:.1%}); "
            f"per sample min {self.tokens_min} / mean {self.tokens_mean:.0f} / max {self.tokens_max}",
            f"shards: {self.per_shard}; held out: {self.heldout}; truncated: {self.truncated}",
        ]
        if self.kept_unknown_resolution:
            lines.append(f"kept {self.kept_unknown_resolution} with no resolution field (the source does not say "
                         f"whether their task was resolved; data.resolved_only={self.resolved_only})")
        lines += format_drops(self.dropped, self.drop_examples)
        lines += [f"manifest: {self.manifest_path} ({self.fingerprint})", f"summary: {self.summary_path}"]
        return "\n".join(lines)


def summary_path(manifest_path: str | Path) -> Path:
    """runs/demo/manifest.jsonl -> runs/demo/manifest.summary.json"""
    p = Path(manifest_path)
    return p.with_name(p.stem + ".summary.json")


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 of the manifest's bytes: equal iff the same samples, lengths and shards were prepared."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"manifest {p}: not found (run prepare-data first)")
    return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()


def load_manifest(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"manifest {p}: not found (run prepare-data first)")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"manifest {p}:{lineno}: not valid JSON ({e.msg})") from None
            missing = [k for k in MANIFEST_FIELDS if k not in row]
            if missing:
                raise UserError(f"manifest {p}:{lineno}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_data(cfg: RunConfig, tokenizer) -> PrepareSummary:
    """Load, filter and render all trajectories; write cfg.manifest and the summary JSON beside it."""
    data = cfg.data
    trajectories, report = load_trajectories(data)
    lines: list[str] = []
    lengths: list[int] = []
    n_assistant = 0
    per_shard = [0] * data.num_shards
    heldout = truncated = 0
    for traj in tqdm(trajectories, desc="rendering", unit="traj"):
        try:
            sample = render_trajectory(traj, tokenizer, data)
        except SampleRejected as e:
            report.add(e.reason, traj.location, str(e))
            continue
        shard = shard_of(sample.sample_id, data.num_shards)
        held = is_heldout(sample.sample_id, data.heldout_fraction)
        entry = {
            "id": sample.sample_id,
            "instance_id": sample.instance_id,
            "location": traj.location,
            "n_tokens": int(len(sample.input_ids)),
            "n_assistant_tokens": int(sample.loss_mask.sum()),
            "n_prompt_tokens": int(len(sample.prompt_ids)),
            "shard": shard,
            "heldout": held,
            "truncated": sample.truncated,
        }
        lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
        lengths.append(entry["n_tokens"])
        n_assistant += entry["n_assistant_tokens"]
        per_shard[shard] += 1
        heldout += held
        truncated += sample.truncated
    if not lines:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.counts.items()))
        raise NothingKept(
            f"data.source {data.source}: no trajectory kept out of {report.rows_read} rows read ({reasons})",
            format_drops(report.counts, report.examples),
        )

    manifest = Path(cfg.manifest)
    _write_atomic(manifest, "".join(lines))
    summary = PrepareSummary(
        source=data.source,
        rows_read=report.rows_read,
        kept=len(lines),
        dropped=dict(report.counts),
        drop_examples=report.examples,
        n_tokens=sum(lengths),
        n_assistant_tokens=n_assistant,
        tokens_min=min(lengths),
        tokens_mean=sum(lengths) / len(lengths),
        tokens_max=max(lengths),
        per_shard=per_shard,
        heldout=heldout,
        truncated=truncated,
        fingerprint=dataset_fingerprint(manifest),
        manifest_path=str(manifest),
        summary_path=str(summary_path(manifest)),
        kept_unknown_resolution=report.kept_unknown_resolution,
        resolved_only=data.resolved_only,
        extra={
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "chat_template_fingerprint": chat_template_fingerprint(tokenizer),
            "data_config": dataclasses.asdict(data),
        },
    )
    _write_atomic(Path(summary.summary_path), json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    return summary


def load_shard_samples(cfg: RunConfig, tokenizer, shard: int) -> list[RenderedSample]:
    """The kept samples of one shard, in input order (same filters as prepare_data).

    Only this shard's trajectories are rendered. When the manifest exists, the ids must match its
    entries for this shard: a mismatch means the data, filters or tokenizer changed since prepare-data.
    """
    data = cfg.data
    if not 0 <= shard < data.num_shards:
        raise UserError(f"shard {shard}: out of range for data.num_shards={data.num_shards}")
    trajectories, _ = load_trajectories(data)
    samples = []
    for traj in trajectories:
        if shard_of(traj.id, data.num_shards) != shard:
            continue
        try:
            samples.append(render_trajectory(traj, tokenizer, data))
        except SampleRejected:
            continue  # counted and reported by prepare_data; the manifest check below catches drift
    manifest = Path(cfg.manifest)
    if manifest.is_file():
        expected = [(r["id"], r["n_tokens"]) for r in load_manifest(manifest) if r["shard"] == shard]
        got = [(s.sample_id, len(s.input_ids)) for s in samples]
        if got != expected:
            raise UserError(
                f"manifest {manifest}: shard {shard} has {len(expected)} samples there but {len(got)} now "
                "(or different ids/lengths); data, filters or tokenizer changed: re-run prepare-data"
            )
    return samples
