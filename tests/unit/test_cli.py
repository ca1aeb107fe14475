"""The top-level command line: one module registers every command; `hyperdistill --help` lists them without
importing the heavy ones; commands that run on a config take the same --config / --set."""

import subprocess
import sys

import click
from click.testing import CliRunner

from hyperdistill import cli
from hyperdistill.cli import main

# Commands that work on an explicit path or checkpoint instead of a run config.
NO_CONFIG = {"build-models", "export-lora", "cache inspect", "cache verify", "cache show", "cache stats"}


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_help_lists_every_command_without_importing_torch_or_zarr():
    code = (
        "import sys; from click.testing import CliRunner; from hyperdistill.cli import main; "
        "r = CliRunner().invoke(main, ['--help']); print(r.exit_code); print(r.output); "
        "print('heavy:', sorted(m for m in ('torch', 'zarr', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "0"
    assert "heavy: []" in out
    for name in ("build-models", "prepare-data", "teacher-cache", "train-student", "train-worker", "cache",
                 "export-lora", "plan", "preflight", "param-count"):
        assert f"\n  {name} " in out


def test_every_command_is_defined_in_the_cli_module_and_reports_user_errors():
    commands = dict(_commands(main))
    assert set(commands) >= {"plan", "export-lora", "train-worker", "cache verify"}
    for name, command in commands.items():
        callback = command.callback
        assert callback.__module__ == cli.__name__, name
        assert getattr(callback, "__wrapped__", None) is not None, f"{name} is not wrapped by reports_user_errors"


def test_commands_on_a_config_take_the_same_config_and_set_options():
    for name, command in _commands(main):
        options = {opt: p for p in command.params for opt in getattr(p, "opts", ())}
        if name in NO_CONFIG:
            assert "--config" not in options, name
            continue
        assert options["--config"].name == "config_path" and options["--config"].default == "configs/demo.yaml", name
        assert options["--set"].name == "overrides" and options["--set"].multiple, name
        assert not [p for p in command.params if isinstance(p, click.Argument)], f"{name} takes a positional argument"


def test_lazy_command_runs():
    result = CliRunner().invoke(main, ["plan", "--help"])
    assert result.exit_code == 0 and "Plan a run on paper" in result.output
