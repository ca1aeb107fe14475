"""Every shipped config loads and validates; overrides and bad input behave."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common import config as C
from common.errors import UserError

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


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
