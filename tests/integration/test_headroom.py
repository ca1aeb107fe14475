"""`hyperdistill headroom` on the demo cache (HF backend): its per-sample numbers are stage 2's loss with B = 0,
its per-task numbers aggregate them over rows, and the command prints them (table and JSON) or one error line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cache_schema import CacheReader
from common.errors import UserError
from common.manifest import load_manifest
from common.models import load_causal_lm
from hyperdistill.cli import main
from stage2_student import headroom
from stage2_student.data import CacheSamples, collate
from stage2_student.headroom import measure, repo_of
from stage2_student.model import build_distill_model
from tests.pipeline_helpers import REPO, config_overrides


@pytest.fixture(scope="module")
def cfg(hf_cache_run):
    return hf_cache_run[0]


@pytest.fixture(scope="module")
def report(cfg):
    return measure(cfg, samples=1000, group_by="instance")


def test_one_sample_equals_the_stage2_loss_with_zero_b(cfg, report):
    """The base student's KL and top-1 for a sample are what stage 2's DistillModel computes at step 0."""
    reader = CacheReader(cfg.cache.path)
    student = load_causal_lm(cfg.student.model, cfg.student.dtype).requires_grad_(False).eval()
    model = build_distill_model(cfg, student).eval()
    seq_len = max(p.seq_len for p in cfg.train.phases)
    for entry in report.per_sample[:2]:
        i = reader.index_of(entry["id"])
        batch = collate([CacheSamples(reader, seq_len)[i]], pad_id=0)
        with torch.no_grad(), model.lora_scope():
            out = model(batch, kind="forward_tail")
        assert entry["rows"] == out.loss.numel() > 0
        assert entry["kl"] == pytest.approx(out.loss.double().mean().item(), rel=1e-9, abs=1e-12)
        assert entry["top1"] == pytest.approx(out.top1_agree.double().mean().item(), abs=1e-12)
    model.injector.remove()


def test_per_task_rows_aggregate_the_samples(cfg, report):
    manifest = {row["id"]: row["instance_id"] for row in load_manifest(cfg.manifest)}
    assert report.samples == len(report.per_sample) == len(CacheReader(cfg.cache.path))
    assert {e["task"] for e in report.per_sample} == {t.task for t in report.tasks} == set(manifest.values())
    assert all(e["task"] == manifest[e["id"]] for e in report.per_sample)
    assert any(t.samples > 1 for t in report.tasks)  # the demo has two trajectories of some instances
    for t in report.tasks:
        mine = [e for e in report.per_sample if e["task"] == t.task]
        rows = sum(e["rows"] for e in mine)
        assert (t.samples, t.rows) == (len(mine), rows)
        assert t.kl == pytest.approx(sum(e["kl"] * e["rows"] for e in mine) / rows, rel=1e-9)
        assert t.top1 == pytest.approx(sum(e["top1"] * e["rows"] for e in mine) / rows, rel=1e-9)
    rows = sum(e["rows"] for e in report.per_sample)
    assert report.overall.rows == rows
    assert report.overall.kl == pytest.approx(sum(e["kl"] * e["rows"] for e in report.per_sample) / rows, rel=1e-9)
    assert [t.kl for t in report.tasks] == sorted((t.kl for t in report.tasks), reverse=True)
    assert report.overall.kl > 0.1 and report.matched == []  # the tiny student is far from its teacher


def test_grouping_by_repo_and_subsets(cfg, report):
    assert repo_of("pallid__textkit-112") == "pallid/textkit" and repo_of("not-swe-bench") == "not-swe-bench"
    by_id = {e["id"]: e for e in report.per_sample}
    by_repo = measure(cfg, samples=6, group_by="repo", match_kl=1e9)  # 6 of the cache's samples, seeded
    mine = [by_id[e["id"]] for e in by_repo.per_sample]
    assert by_repo.samples == 6 and {t.task for t in by_repo.tasks} == {repo_of(e["task"]) for e in mine}
    rows = sum(e["rows"] for e in mine)
    assert by_repo.overall.kl == pytest.approx(sum(e["kl"] * e["rows"] for e in mine) / rows, rel=1e-9)
    assert len(by_repo.matched) == len(by_repo.tasks)  # every task is under an enormous threshold
    few = measure(cfg, samples=3, group_by="sample", split="train", seed=1)
    assert few.samples == 3 and {t.task for t in few.tasks} == {e["id"] for e in few.per_sample}
    again = measure(cfg, samples=3, group_by="sample", split="train", seed=1)
    assert [e["id"] for e in again.per_sample] == [e["id"] for e in few.per_sample]  # seeded
    assert all(e["kl"] == pytest.approx(by_id[e["id"]]["kl"], rel=1e-9) for e in few.per_sample)


def test_cli_table_json_and_errors(cfg, tmp_path):
    base = ["headroom", "--config", str(REPO / "configs" / "demo.yaml")]
    for item in config_overrides(cfg):
        base += ["--set", item]
    table = CliRunner().invoke(main, [*base, "--samples", "2", "--split", "heldout"])
    assert table.exit_code == 0, table.output
    assert "KL (nats/row)" in table.output and "overall" in table.output
    assert "already matches the teacher (KL <= 0.05)" in table.output
    as_json = CliRunner().invoke(main, [*base, "--samples", "2", "--json", "--group-by", "repo"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)  # progress bars go to stderr
    assert data["samples"] == 2 and data["group_by"] == "repo" and data["overall"]["rows"] > 0
    assert sum(t["rows"] for t in data["tasks"]) == data["overall"]["rows"]

    missing = CliRunner().invoke(main, [*base, "--set", f"manifest={tmp_path / 'none.jsonl'}"])
    assert missing.exit_code == UserError.exit_code
    assert "error: manifest" in missing.output and "not found" in missing.output
    other = tmp_path / "other.jsonl"
    other.write_text(open(cfg.manifest).read().replace('"heldout": false', '"heldout": true', 1))
    wrong = CliRunner().invoke(main, [*base, "--set", f"manifest={other}"])
    assert wrong.exit_code == UserError.exit_code and "is not the manifest cache" in wrong.output


def test_cli_defaults_are_the_modules():
    params = {p.name: p.default for p in main.commands["headroom"].params}
    assert params["samples"] == headroom.DEFAULT_SAMPLES and params["match_kl"] == headroom.DEFAULT_MATCH_KL
    assert params["group_by"] == "instance" and params["split"] == "all"
