"""Launching stage 2 on this node: check everything, lease train.output_dir, then start torchrun.

The lease (`run.lease` in train.output_dir, cache_schema's lease mechanism: exclusive create, host + pid +
expiry, a dead holder's lease taken over) keeps two runs from writing one folder. `train-student` claims it
before torchrun starts, so a second launch is refused with one line naming the holder; it hands the claim to
the run by its owner name (OWNER_ENV), and rank 0 re-claims it under its own pid at set-up (the same owner
may), so the lease dies with the process that writes. Launched directly by torchrun, rank 0 claims it itself.
Released when the run ends; left behind by a killed run, it is stale (dead pid) and the next run takes it over.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Sequence

from cache_schema.lease import LEASE_TTL_S, Lease, LeaseLost
from cache_schema.storage import CacheLocation
from common.config import RunConfig
from stage2_student.checks import check_before_launch

LEASE_NAME = "run.lease"
OWNER_ENV = "HYPERDISTILL_RUN_OWNER"
"""Set by `launch` for the ranks: the lease owner name they continue under."""
POLL_S = 5.0


def new_owner() -> str:
    return f"train-student {socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def output_lease(output_dir: str, owner: str, ttl_s: float = LEASE_TTL_S) -> Lease:
    """The lease on a run's output folder."""
    location = CacheLocation(output_dir)
    return Lease(location, LEASE_NAME, owner, ttl_s, where=f"train.output_dir {location.path}")


def launch(cfg: RunConfig, config_path: str, overrides: Sequence[str], nproc: int) -> int:
    """Check (UserError on bad input), lease the output folder (UserError if a live run holds it), run torchrun
    with `nproc` processes on this node, and return its exit code."""
    check_before_launch(cfg, nproc)
    owner = new_owner()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "hyperdistill.cli", "train-worker", "--config", config_path]  # fmt: skip
    for item in overrides:
        cmd += ["--set", item]
    with output_lease(cfg.train.output_dir, owner) as lease:
        proc = subprocess.Popen(cmd, env={**os.environ, OWNER_ENV: owner})
        while True:
            try:
                return proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                if lease.record is not None:
                    try:  # ours until rank 0 re-claims it; from then on rank 0 renews it
                        lease.renew_if_due()
                    except LeaseLost:
                        lease.record = None  # nothing of ours left to release
            except KeyboardInterrupt:  # the terminal's Ctrl-C reached torchrun too: let it stop the ranks
                proc.wait()
                raise
