"""Training metrics to stdout (one structured line per log) and TensorBoard, from rank 0 only."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool):
        self.enabled = enabled
        self.t0 = time.time()
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a")

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"[train {time.time() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    def scalars(self, split: str, values: dict[str, float], step: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)
        record = {"split": split, "step": step, **{k: round(float(v), 6) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        of = f"/{total}" if total else ""
        self.info(f"{split} step {step}{of} {shown}")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


class Sums:
    """Named running sums (float64), added up over ranks as one tensor: every rank holds the same names, in the
    same order (they are all given at construction)."""

    def __init__(self, *names: str):
        self.values = dict.fromkeys(names, 0.0)

    def add(self, **values: float) -> None:
        for name, value in values.items():
            self.values[name] += float(value)

    def reduced(self, all_reduce_sum, device) -> dict[str, float]:
        """The sums over every rank (`all_reduce_sum`: distributed.all_reduce_sum)."""
        import torch

        total = all_reduce_sum(torch.tensor(list(self.values.values()), dtype=torch.float64, device=device)).cpu()
        return dict(zip(self.values, total.tolist()))
