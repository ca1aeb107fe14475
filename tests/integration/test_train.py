"""Stage 2 training for real: torchrun with 2 gloo processes and FSDP2 on the tiny student, fed by a
cache built by stage 1 (HF backend) from the bundled sample. Checks learning, metrics, checkpoints,
the kill-and-resume equivalence and the refusal of a mismatched cache."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from cache_schema import CacheReader
from common.errors import UserError
from common.models import load_tokenizer
from stage2_student import checkpoint
from stage2_student.checks import check_compatible
from tests.pipeline_helpers import torchrun_train

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def cache_cfg(hf_cache_run):
    return hf_cache_run[0]


def _kill_launcher_and_ranks(proc) -> None:
    """SIGKILL torchrun and its ranks. torchrun starts each rank in a session of its own, so killing the
    launcher's process group alone leaves the ranks running (and writing) as orphans."""
    ranks = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(_parent(pid) is not None for pid in ranks) and time.time() < deadline:
        time.sleep(0.1)  # gone, or a zombie nobody reaps (both count as dead)


def _parent(pid: int) -> int | None:
    """The parent pid of a live (not zombie) process, None otherwise."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[1])


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    # Reads a DCP checkpoint without building the model it came from (single process, no group).
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    last = checkpoint.latest_checkpoint(output_dir)
    assert last is not None
    return _load_state_dict_from_keys(keys={"hypernet"}, checkpoint_id=str(last))["hypernet"]


def test_training_lowers_heldout_kl_and_logs(two_rank_run):
    out, proc = two_rank_run
    evals = [m for m in _metrics(out) if m["split"] == "eval"]
    train = [m for m in _metrics(out) if m["split"] == "train"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == train[-1]["step"]
    assert evals[-1]["kl"] < evals[0]["kl"], evals
    for key in ("loss", "top1", "tail", "lr", "tokens_per_s", "grad_norm"):
        assert key in train[-1]
    assert "held-out KL to the teacher" in proc.stderr
    assert "task vector standardised over" in proc.stderr
    weights = _final_weights(out)  # the calibration is in the checkpoint, as measured (not the identity)
    assert not torch.equal(weights["encoder.z_mean"], torch.zeros_like(weights["encoder.z_mean"]))
    assert bool((weights["encoder.z_std"] != 1).all())
    assert any((out / "tensorboard").iterdir())
    assert (out / "resolved_config.yaml").exists()


def test_kill_and_resume_matches_uninterrupted(cache_cfg, two_rank_run, tmp_path):
    ref_out, _ = two_rank_run
    out = tmp_path / "run-b"
    proc = torchrun_train(cache_cfg, out, wait=False)
    deadline = time.time() + 300
    while checkpoint.latest_checkpoint(out) is None:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    _kill_launcher_and_ranks(proc)  # mid-run

    killed_at = checkpoint.latest_checkpoint(out)
    final_ref = checkpoint.latest_checkpoint(ref_out)
    assert killed_at.name < final_ref.name, "the run finished before it could be killed"

    resumed = torchrun_train(cache_cfg, out)
    assert "resumed from" in resumed.stderr
    a, b = _final_weights(ref_out), _final_weights(out)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_mismatched_cache_is_refused(cache_cfg):
    reader = CacheReader(cache_cfg.cache.path)
    tok = load_tokenizer(cache_cfg.student.model)
    check_compatible(reader, tok, "tiny-student")  # the matching one passes
    tok.chat_template = tok.chat_template.replace("<tool_call>", "<call>")
    with pytest.raises(UserError, match="chat template fingerprint"):
        check_compatible(reader, tok, "tiny-student")
