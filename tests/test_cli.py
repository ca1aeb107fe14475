"""The top-level command line: `hyperdistill --help` lists every command without importing the heavy ones."""

import subprocess
import sys

import click
from click.testing import CliRunner

from hyperdistill.cli import LazyGroup, main


def test_help_lists_every_command_without_importing_torch_or_zarr():
    code = (
        "import sys; from click.testing import CliRunner; from hyperdistill.cli import main; "
        "r = CliRunner().invoke(main, ['--help']); print(r.exit_code); print(r.output); "
        "print('heavy:', sorted(m for m in ('torch', 'zarr', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "0"
    assert "heavy: []" in out
    for name in ("build-models", "prepare-data", "teacher-cache", "train-student", "cache", "export-lora", "plan"):
        assert f"\n  {name} " in out


def test_lazy_short_help_matches_the_commands_own():
    ctx = click.Context(main)
    for name, (_, _, text) in LazyGroup.LAZY.items():
        command = main.get_command(ctx, name)
        assert command.name == name
        assert command.help.strip().splitlines()[0] == text


def test_lazy_command_runs():
    result = CliRunner().invoke(main, ["plan", "--help"])
    assert result.exit_code == 0 and "Plan a run on paper" in result.output
