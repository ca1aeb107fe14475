"""Stage 2's checks of its inputs: every one raises UserError (one line naming the field, file or cache).

`check_before_launch` runs them all in the launching process, before torchrun starts a single rank
(`hyperdistill train-student`); the trainer runs the same cache and output-dir checks again at set-up, so a
direct torchrun launch gets them too, and `preflight` reports the cache checks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.config import RunConfig, config_from_dict, config_hash
from common.errors import UserError
from common.tokenizer import chat_template_fingerprint, tokenizer_fingerprint
from stage2_student import checkpoint

log = logging.getLogger("hyperdistill.stage2")


def check_compatible(reader, tokenizer, student_name: str) -> None:
    """Refuse a cache rendered with another tokenizer or chat template: never train on mismatched ids."""
    meta = reader.meta
    ours = {"tokenizer": tokenizer_fingerprint(tokenizer), "chat template": chat_template_fingerprint(tokenizer)}
    theirs = {"tokenizer": meta.tokenizer.fingerprint, "chat template": meta.chat_template_fingerprint}
    for what in ours:
        if ours[what] != theirs[what]:
            raise UserError(
                f"cache {reader.path}: {what} fingerprint {theirs[what][:19]} differs from student {student_name}'s "
                f"{ours[what][:19]}: re-run stage 1 with this student's tokenizer"
            )


def check_rows(reader, cfg: RunConfig) -> None:
    """The cache's rows are what this config says (cache.rows, cache.k or cache.draws), and the loss suits them."""
    meta, c = reader.meta, cfg.cache
    sampled = getattr(meta, "sampled", None)
    kind = "topk" if sampled is None else "sampled"
    if kind != c.rows:
        raise UserError(f"cache {reader.path}: its rows are {kind}, but this config says cache.rows={c.rows}")
    if sampled is None and meta.k != c.k:
        raise UserError(f"cache {reader.path}: k is {meta.k} in the cache but cache.k={c.k} in this config")
    if sampled is not None and sampled.draws != c.draws:
        raise UserError(f"cache {reader.path}: {sampled.draws} draws per row in the cache but cache.draws={c.draws} "
                        "in this config")  # fmt: skip
    check_sampled_rows(reader, cfg)


def check_sampled_rows(reader, cfg: RunConfig) -> None:
    """Sampled rows are draws from the teacher at T = 1: only forward_tail at T = 1 (RS-KD) is unbiased on them."""
    sampled = getattr(reader.meta, "sampled", None)
    if sampled is None or cfg.train.online_teacher:  # online, the rows' contents are not the loss
        return
    if cfg.train.loss != "forward_tail" or cfg.train.temperature != 1.0:
        raise UserError(
            f"cache {reader.path}: sampled rows ({sampled.draws} draws at T=1) need train.loss=forward_tail and "
            f"train.temperature=1.0 (got {cfg.train.loss}, {cfg.train.temperature}): only the forward "
            "cross-entropy on draws from the teacher is unbiased"
        )
    if sampled.support_k is not None:
        log.warning(
            "cache %s: sampled rows with support top-%d (vLLM): draws beyond the teacher's top-K are unnamed, "
            "so the target is slightly biased toward the drawn ids (see cache_schema.layout)", reader.path,
            sampled.support_k,
        )


def check_cache(reader, cfg: RunConfig, tokenizer) -> None:
    check_compatible(reader, tokenizer, cfg.student.model)
    check_rows(reader, cfg)


def same_config(saved: dict, cfg: RunConfig) -> bool:
    """Whether a checkpoint's config.json was written by a run of `cfg`. By hash, or (for checkpoints saved
    before config fields were added: their hash covers fewer fields) by rebuilding the saved config, which
    fills added fields with their defaults."""
    if saved.get("hash") == config_hash(cfg):
        return True
    try:
        return "config" in saved and config_from_dict(saved["config"]) == cfg
    except UserError:
        return False


def check_output_dir(cfg: RunConfig) -> Path | None:
    """train.output_dir is a folder (or absent) and its newest checkpoint, if any, was saved by this config;
    returns that checkpoint (the run resumes from it)."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir {out}: exists and is not a folder")
    last = checkpoint.latest_checkpoint(out)
    if last is not None and not same_config(checkpoint.saved_config(last), cfg):
        raise UserError(f"checkpoint {last}: saved with another config; use a new train.output_dir")
    return last


def check_teacher_vocab(cfg: RunConfig) -> None:
    """A resident teacher (online_teacher / eval_teacher) must share the student's vocabulary (configs only)."""
    if not (cfg.train.online_teacher or cfg.train.eval_teacher):
        return
    from common.model_configs import model_config

    t, s = cfg.teacher, cfg.student
    teacher_vocab = model_config(t.model, t.revision, t.trust_remote_code)[0].vocab_size
    student_vocab = model_config(s.model, s.revision, s.trust_remote_code)[0].vocab_size
    if teacher_vocab != student_vocab:
        raise UserError(
            f"teacher.model {t.model}: vocabulary of {teacher_vocab} ids differs from the student's {student_vocab}: "
            "a full-vocabulary KL needs the same ids on both sides"
        )


def check_before_launch(cfg: RunConfig, world_size: int) -> None:
    """Everything stage 2 can check without a model, for a run on `world_size` ranks: the mesh, the cache
    (present, readable, this student's tokenizer and template, the configured K and row kind, a loss that
    suits them), the output folder, a resident teacher's vocabulary, and that at least one step fits."""
    from cache_schema import CacheReader
    from common.models import load_tokenizer
    from stage2_student.data import manifest_split, plan_phases

    if world_size < 1:
        raise UserError(f"--nproc must be >= 1, got {world_size}")
    shard = cfg.train.shard_size
    if shard is not None and (shard < 1 or world_size % shard):
        raise UserError(f"config: train.shard_size {shard} does not divide the {world_size} ranks")
    reader = CacheReader(cfg.cache.path)
    check_cache(reader, cfg, load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code))
    check_output_dir(cfg)
    check_teacher_vocab(cfg)
    train_idx, _ = manifest_split(reader, cfg.manifest)
    plan_phases(cfg, train_idx, 0, world_size)
