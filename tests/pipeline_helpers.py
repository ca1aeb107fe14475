"""Shared set-up for the pipeline tests: the demo config pointed at a temporary folder."""

from __future__ import annotations

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
