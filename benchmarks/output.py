"""What the benchmarks' command lines share: the --quick and --json options, and writing the result as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_output_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """--quick (a smoke run: `quick_help` says what it cuts) and --json PATH."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", dest="json_path", help="write the results here (default: stdout)")


def write_json(result, json_path: str | None) -> None:
    """`result` as indented JSON into `json_path`, or on stdout without one (numpy scalars as floats)."""
    text = json.dumps(result, indent=2, default=float)
    if json_path:
        Path(json_path).write_text(text + "\n")
    else:
        print(text)
