"""Every shipped config loads and validates; overrides and bad input behave."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from common import config as C
from common.errors import UserError

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "qwen3_coder.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = C.load_config(path)
    assert isinstance(cfg, C.RunConfig)
    assert cfg.cache.k >= 1 and cfg.train.phases


def test_real_run_config_names_the_real_models():
    cfg = C.load_config(Path(CONFIGS[0]).parent / "qwen3_coder.yaml")
    assert cfg.teacher.model == "Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8"
    assert cfg.teacher.quantization == "fp8" and cfg.cache.k == 128
    assert cfg.student.model == "Qwen/Qwen3-Coder-Next"
    assert cfg.teacher.max_model_len >= 32768
    assert [p.seq_len for p in cfg.train.phases] == [8192, 8192, 32768]


def test_every_field_is_documented():
    def walk(cls):
        docs = C.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no one-line doc"
            if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else getattr(C, f.type, None)):
                walk(getattr(C, f.type) if isinstance(f.type, str) else f.type)

    walk(C.RunConfig)
    for cls in (C.DataConfig, C.TeacherConfig, C.StudentConfig, C.CacheConfig, C.HyperConfig, C.PhaseConfig, C.TrainConfig):
        assert set(C.field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}


def test_overrides_apply_and_are_typed():
    cfg = C.load_config(None, ["cache.k=64", "train.lr=3e-4", "data.exclude_instances=[a, b]", "teacher.quantization=null"])
    assert cfg.cache.k == 64 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.exclude_instances == ["a", "b"] and cfg.teacher.quantization is None


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["cache.kk=3"], "cache.kk"),
        (["cache.k=many"], "cache.k"),
        (["cache.positions=some"], "cache.positions"),
        (["cache.k=0"], "cache.k"),
        (["train.batch_size=true"], "train.batch_size"),
        (["nonsense"], "key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        C.load_config(None, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        C.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(UserError, match="bad.yaml"):
        C.load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config(None, ["cache.k=32"])
    out = C.save_resolved(cfg, tmp_path)
    again = C.load_config(out)
    assert again == cfg and C.config_hash(again) == C.config_hash(cfg)


# ---------------------------------------------------------------------------------------------
# Ranges of the numeric fields


def _sections(cls=C.RunConfig, prefix=""):
    """(dotted path of the section, its class, whether it is a list element) for every section of the tree."""
    yield prefix, cls, False
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp, f"{path}.")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield path, typing.get_args(tp)[0], True


def _numeric_fields():
    for prefix, cls, listed in _sections():
        hints = typing.get_type_hints(cls)
        for name in C.numeric_fields(cls):
            is_int = int in (typing.get_args(hints[name]) or (hints[name],))
            yield prefix, cls, listed, name, is_int


def _outside(spec: str, is_int: bool) -> list:
    """Values just outside a RANGES spec, on each bounded side."""
    spec = spec.strip()
    if spec[0] in "([":
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        values = [lo if spec[0] == "(" else lo - 1, hi if spec[-1] == ")" else hi + 1]
    else:
        op, bound = spec.split()
        values = [float(bound) if op == ">" else float(bound) - 1]
    return [int(v) if is_int else v for v in values]


def _override(prefix: str, listed: bool, name: str, value) -> str:
    return f"{prefix}=[{{{name}: {value}}}]" if listed else f"{prefix}{name}={value}"


def test_the_walk_sees_every_section_and_the_numeric_fields():
    seen = {(prefix, name) for prefix, _, _, name, _ in _numeric_fields()}
    assert {("cache.", "k"), ("train.", "lr"), ("train.phases", "lr"), ("teacher.", "kv_cache_gib"),
            ("data.", "heldout_fraction")} <= seen
    assert not any(name in ("resolved_only", "enforce_eager", "online_teacher") for _, name in seen)  # bools


def test_every_numeric_field_declares_its_range():
    """A new int or float config field must say which values it takes (its section's RANGES)."""
    for prefix, cls, _, name, _ in _numeric_fields():
        assert name in getattr(cls, "RANGES", {}), f"{prefix}{name} has no entry in {cls.__name__}.RANGES"
    for _, cls, _ in _sections():
        stale = set(getattr(cls, "RANGES", {})) - set(C.numeric_fields(cls))
        assert not stale, f"{cls.__name__}.RANGES names fields that are not numeric fields: {sorted(stale)}"


def test_defaults_and_shipped_configs_are_in_range():
    C.check_ranges(C.RunConfig())
    for path in CONFIGS:
        C.check_ranges(C.load_config(path))


@pytest.mark.parametrize("prefix, cls, listed, name, is_int",
                         list(_numeric_fields()), ids=lambda v: v if isinstance(v, str) else "")
def test_an_out_of_range_value_of_every_numeric_field_is_refused_naming_it(prefix, cls, listed, name, is_int):
    spec = cls.RANGES[name]
    shown = f"{prefix}[0].{name}" if listed else f"{prefix}{name}"
    for value in _outside(spec, is_int):
        with pytest.raises(UserError) as err:
            C.load_config(None, [_override(prefix, listed, name, value)])
        message = str(err.value)
        assert message.startswith(f"config field '{shown}': ") and "out of range" in message, message
        assert "\n" not in message
    if not is_int:
        with pytest.raises(UserError, match="out of range"):
            C.load_config(None, [_override(prefix, listed, name, ".nan")])


def test_range_specs_read_as_written():
    assert C.in_range(0, "[0, 1)") and not C.in_range(1, "[0, 1)")
    assert C.in_range(1, "(0, 1]") and not C.in_range(0, "(0, 1]")
    assert C.in_range(1, ">= 1") and not C.in_range(0.5, ">= 1")
    assert not C.in_range(0, "> 0") and C.in_range(1e-9, "> 0")
    with pytest.raises(ValueError):
        C.in_range(1, "<= 3")


def test_a_bad_override_is_one_error_line_and_exit_2_in_every_config_command():
    from click.testing import CliRunner

    from hyperdistill.cli import main

    runner = CliRunner()
    for name in ("prepare-data", "teacher-cache", "train-student", "train-worker", "preflight", "param-count", "plan"):
        result = runner.invoke(main, [name, "--set", "train.lr=-1"])
        assert result.exit_code == 2, (name, result.output)
        assert result.output.strip().splitlines() == [
            "error: config field 'train.lr': -1.0 is out of range: must be > 0"], (name, result.output)


def test_config_hash_is_stable_and_takes_the_dict_form():
    """Cache parts and checkpoints store this hash: a change would make every existing one look foreign."""
    assert C.config_hash({"name": "demo", "k": 128}) == "571f316dbf011175"
    cfg = C.load_config(None, ["cache.k=64"])
    assert C.config_hash(cfg) == C.config_hash(C.to_dict(cfg))
    assert C.config_hash(cfg) != C.config_hash(C.load_config(None))
