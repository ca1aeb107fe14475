"""Shared set-up for the pipeline tests: the demo config pointed at a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from common.config import RunConfig, load_config

REPO = Path(__file__).resolve().parent.parent


def demo_config(root: Path, *overrides: str) -> RunConfig:
    """configs/demo.yaml with every output under `root`."""
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"manifest={root / 'manifest.jsonl'}",
            f"cache.path={root / 'cache.zarr'}",
            f"train.output_dir={root / 'student'}",
            # Tests cut trajectories to 1k tokens: the full-vocabulary top-K over 151,936 ids is the cost.
            "data.max_tokens=1024",
            "data.overlong=truncate",
            *overrides,
        ],
    )


def config_overrides(cfg: RunConfig) -> list[str]:
    """The --set arguments that reproduce `cfg`'s paths in a subprocess."""
    return [
        f"manifest={cfg.manifest}",
        f"cache.path={cfg.cache.path}",
        f"train.output_dir={cfg.train.output_dir}",
        f"data.max_tokens={cfg.data.max_tokens}",
        f"data.overlong={cfg.data.overlong}",
    ]


# A small stage-2 run: short context, 6 optimizer steps on 2 ranks, checkpoints every 2 steps.
TRAIN = [
    "train.phases=[{name: main, epochs: 2, seq_len: 768}]",
    "train.max_steps=6",
    "train.batch_size=1",
    "train.checkpoint_every=2",
    "train.eval_every=100",
    "train.warmup_steps=2",
    "train.lr=1e-3",
    "train.loss_chunk=256",
    "hyper.encoder_dim=64",
    "hyper.generator_dim=128",
    "hyper.encoder_layers=1",
]


def torchrun_train(cfg: RunConfig, output_dir: Path, extra: list[str] = (), wait: bool = True, settings=TRAIN):
    """`train-worker` under torchrun with 2 gloo ranks on `cfg`'s cache, `settings` and `extra`. wait=False
    returns the Popen (its own session, stdout and stderr together); otherwise the finished process, checked."""
    sets = [*config_overrides(cfg), f"train.output_dir={output_dir}", *settings, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hyperdistill.cli", "train-worker", "--config", str(REPO / "configs" / "demo.yaml")]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# `python -c KILLER CONFIG SHARD KEY=VALUE...`: stage 1 on one shard whose process SIGKILLs itself at the
# backend's second score() call, mid-shard, with one batch already written to the part.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from common.config import load_config
    import stage1_teacher.run as run
    real = run.make_backend

    def dying_backend(*args, **kwargs):
        backend = real(*args, **kwargs)
        calls = {"n": 0}
        score = backend.score
        def score_then_die(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:          # mid-shard: one batch already written to the part
                os.kill(os.getpid(), signal.SIGKILL)
            return score(*a, **k)
        backend.score = score_then_die
        return backend

    if __name__ == "__main__":
        run.make_backend = dying_backend
        cfg = load_config(sys.argv[1], sys.argv[3:])
        run.main(cfg, shards=[int(sys.argv[2])])
    """
)
