"""`train-student` checks before it launches: bad input is one line `error: ...` and exit code 2 from the parent
process, before torchrun starts (no failure report, no traceback); train.output_dir is leased to one live run, a
second launch on it is refused naming the holder, and a dead holder's lease is taken over by a run that resumes."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys

import pytest

from cache_schema.lease import LeaseRecord
from cache_schema.storage import CacheLocation
from common.config import load_config
from stage2_student.launch import LEASE_NAME, output_lease
from tests.pipeline_helpers import REPO, config_overrides

SMALL = ["train.phases=[{name: main, epochs: 1, seq_len: 512}]", "train.max_steps=1", "train.batch_size=1",
         "train.checkpoint_every=100", "train.loss_chunk=256", "train.eval_every=100",
         "hyper.encoder_dim=64", "hyper.generator_dim=128", "hyper.encoder_layers=1"]  # fmt: skip


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from hyperdistill.cli import main; main()", *args]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _train_student_args(cache_cfg, output_dir, *extra: str, nproc: int = 1) -> list[str]:
    sets = [*config_overrides(cache_cfg), f"train.output_dir={output_dir}", *SMALL, *extra]
    args = ["train-student", "--config", str(REPO / "configs" / "demo.yaml"), "--nproc", str(nproc)]
    for s in sets:
        args += ["--set", s]
    return args


def _train_student(cache_cfg, output_dir, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return _cli(*_train_student_args(cache_cfg, output_dir, *extra, nproc=nproc))


def _train_student_in_process(cache_cfg, output_dir, *extra: str) -> subprocess.CompletedProcess:
    """The same command through click's runner: no interpreter start-up (seconds each on 2 cores)."""
    from click.testing import CliRunner

    from hyperdistill.cli import main

    args = _train_student_args(cache_cfg, output_dir, *extra)
    result = CliRunner().invoke(main, args)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "torch.distributed" not in proc.stderr and not proc.stdout
    return lines[0]


@pytest.mark.parametrize("bad, message, process", [
    ("cache.path=/nonexistent.zarr", "/nonexistent.zarr: no cache there", "subprocess"),
    ("cache.k=64", "k is 128 in the cache but cache.k=64", "in-process"),
    ("cache.rows=sampled", "its rows are topk, but this config says cache.rows=sampled", "in-process"),
    ("train.batch_size=100", "no optimizer step fits", "in-process"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2_before_torchrun(hf_cache_run, tmp_path, bad, message, process):
    """One case as the user runs it (a fresh interpreter: what reaches the terminal); the others through click's
    runner, which sees the same exit code and stderr."""
    cache_cfg, _ = hf_cache_run
    run = _train_student if process == "subprocess" else _train_student_in_process
    line = _one_error_line(run(cache_cfg, tmp_path / "student", bad))
    assert message in line, line
    assert not (tmp_path / "student").exists()  # nothing was launched, nothing written


def test_a_checkpoint_of_another_config_is_refused_before_launch(hf_cache_run, tmp_path):
    cache_cfg, _ = hf_cache_run
    out = tmp_path / "student"
    from stage2_student.distributed import DistEnv
    from stage2_student.train import train

    import torch

    cfg = load_config(REPO / "configs" / "demo.yaml", [*config_overrides(cache_cfg), f"train.output_dir={out}", *SMALL])
    train(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    assert not (out / LEASE_NAME).exists()  # released at the end of the run
    line = _one_error_line(_train_student_in_process(cache_cfg, out, "train.lr=5e-4"))
    assert "saved with another config" in line

    # A dead holder's lease (left by a killed run) is taken over, and the run resumes from its checkpoint.
    ctx = mp.get_context("fork")
    child = ctx.Process(target=_claim_and_die, args=(str(out),))
    child.start()
    child.join(30)
    left = LeaseRecord.from_bytes(CacheLocation(str(out)).read_bytes(LEASE_NAME))
    assert left.pid == child.pid and left.owner == "killed-run"
    proc = _train_student(cache_cfg, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at step 1" in proc.stderr
    assert not (out / LEASE_NAME).exists()


def _claim_and_die(output_dir: str) -> None:
    output_lease(output_dir, "killed-run").acquire()
    os._exit(0)  # no release: the lease stays behind with a dead pid


def test_a_live_runs_output_dir_is_refused_naming_the_holder(hf_cache_run, tmp_path):
    cache_cfg, _ = hf_cache_run
    out = tmp_path / "student"
    with output_lease(str(out), "the-other-run"):  # held by this (live) process
        line = _one_error_line(_train_student(cache_cfg, out))
    assert f"train.output_dir {out}" in line and "the-other-run" in line
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in line
    assert not (out / "metrics.jsonl").exists()
