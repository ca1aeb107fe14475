"""What every teacher backend offers stage 1: top-K log-probs at chosen positions of token sequences.

Convention (the cache's): the row for stored position t is the teacher's distribution over token t+1
given tokens 0..t, as log-softmax over the full vocabulary at temperature 1, its K best entries in rank
order (best first). A backend returns exactly the rows asked for, in the order asked.

Sampled rows (cache.rows=sampled): the caller also passes uniforms, [R_i, N] per sequence
(stage1_teacher.sampling.sample_uniforms), and every returned TopK then carries `draws` [R, N]: N tokens
drawn by inverse CDF from row r's distribution with those uniforms. The HF backend's draws are exact samples
from the full distribution, and so are vLLM's with `teacher.capture: engine` (the worker resolves them the same
way); vLLM's public prompt log-probs (`capture: public`) give only the top-K, so those draws beyond the top-K's
mass stay -1 (sampling.TAIL_DRAW) and are stored as tail draws. All draw the same token wherever a draw is
not -1 (up to float rounding at CDF edges).

Backends: `vllm` (production): `capture: engine` computes the rows inside vLLM's workers
(`stage1_teacher.capture_backend`), `capture: public` reads vLLM's public prompt log-probs
(`stage1_teacher.vllm_backend`, the reference for the capture); and `hf` (plain transformers forward, the
reference; `stage1_teacher.hf_backend`). `make_backend` picks one from the teacher config; the heavy
imports happen there, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    from common.config import TeacherConfig


class TopK(NamedTuple):
    """The teacher's top-K at R stored positions of one sequence."""

    ids: np.ndarray
    """uint32 [R, K]: token ids, best first; K distinct ids per row."""
    logprobs: np.ndarray
    """float32 [R, K]: log-probabilities (<= 0), non-increasing along each row."""
    draws: np.ndarray | None = None
    """int64 [R, N] when uniforms were given: drawn token ids, -1 for a draw outside the top-K (module doc)."""


class TeacherBackend(Protocol):
    k: int
    """Entries per row."""
    engine_version: str
    """What computed the rows, e.g. 'vllm==0.32.0' (recorded in the cache's metadata)."""

    def score(self, sequences: list[np.ndarray], positions: list[np.ndarray],
              uniforms: list[np.ndarray] | None = None) -> list[TopK]:
        """Top-K rows of sequence i at positions[i] (ascending, each < len(sequences[i]) - 1); with
        uniforms ([len(positions[i]), N] float64 in [0, 1) per sequence) also the rows' draws."""
        ...

    def close(self) -> None:
        """Release the engine (processes, memory); the backend is unusable afterwards."""
        ...


def check_request(
    sequences: list[np.ndarray], positions: list[np.ndarray], max_len: int, vocab_size: int
) -> list[np.ndarray]:
    """Validate a score() request; return the positions as int64 arrays.

    A sequence longer than the engine's max_model_len is the caller's error (the data step must drop
    or cut it first, see data.max_tokens / data.overlong): it is refused here, never silently cut.
    """
    if len(sequences) != len(positions):
        raise ValueError(f"score(): {len(sequences)} sequences but {len(positions)} position arrays")
    checked = []
    for i, (seq, pos) in enumerate(zip(sequences, positions)):
        seq = np.asarray(seq)
        pos = np.asarray(pos, dtype=np.int64)
        if seq.ndim != 1 or pos.ndim != 1:
            raise ValueError(f"score(): sequence {i}: tokens and positions must be 1-D arrays")
        if len(seq) > max_len:
            raise ValueError(
                f"score(): sequence {i} has {len(seq)} tokens, more than the teacher's max_model_len {max_len} "
                "(drop or cut it before scoring: data.max_tokens, data.overlong)"
            )
        if len(seq) and (seq.min() < 0 or seq.max() >= vocab_size):
            raise ValueError(f"score(): sequence {i} holds token ids outside [0, {vocab_size})")
        if len(pos):
            if pos[0] < 0 or pos[-1] >= len(seq) - 1:
                raise ValueError(
                    f"score(): sequence {i}: positions must lie in [0, {len(seq) - 1}) (the last token has no "
                    f"next token), got {pos[0]}..{pos[-1]}"
                )
            if np.any(np.diff(pos) <= 0):
                raise ValueError(f"score(): sequence {i}: positions must be strictly ascending")
        checked.append(pos)
    return checked


def check_uniforms(uniforms: list[np.ndarray] | None, positions: list[np.ndarray]) -> list[np.ndarray] | None:
    """Validate score()'s uniforms against the checked positions: one [R_i, N] array per sequence, the same N
    for all, values in [0, 1); returned as float64 arrays."""
    if uniforms is None:
        return None
    if len(uniforms) != len(positions):
        raise ValueError(f"score(): {len(positions)} position arrays but {len(uniforms)} uniform arrays")
    checked = []
    for i, (u, pos) in enumerate(zip(uniforms, positions)):
        u = np.asarray(u, dtype=np.float64)
        if u.ndim != 2 or u.shape[0] != len(pos) or (checked and u.shape[1] != checked[0].shape[1]):
            raise ValueError(f"score(): sequence {i}: uniforms must be [{len(pos)}, N] with one N for all, "
                             f"got {u.shape}")
        if u.size and (u.min() < 0 or u.max() >= 1):
            raise ValueError(f"score(): sequence {i}: uniforms must lie in [0, 1)")
        checked.append(u)
    return checked


def empty_topk(k: int, draws: int | None = None) -> TopK:
    """No rows; with `draws` N, an empty [0, N] draws array too."""
    return TopK(np.zeros((0, k), dtype=np.uint32), np.zeros((0, k), dtype=np.float32),
                None if draws is None else np.zeros((0, draws), dtype=np.int64))


def make_backend(teacher_cfg: TeacherConfig, model_path: str, k: int) -> TeacherBackend:
    """The backend named by teacher_cfg.backend, loaded from model_path (a local folder or hub id)."""
    if k < 1:
        raise ValueError(f"make_backend(): k must be >= 1, got {k}")
    if teacher_cfg.backend == "vllm" and teacher_cfg.capture == "engine":
        from stage1_teacher.capture_backend import CaptureBackend

        return CaptureBackend(teacher_cfg, model_path, k)
    if teacher_cfg.backend == "vllm":
        from stage1_teacher.vllm_backend import VllmBackend

        return VllmBackend(teacher_cfg, model_path, k)
    if teacher_cfg.backend == "hf":
        from stage1_teacher.hf_backend import HfBackend

        return HfBackend(teacher_cfg, model_path, k)
    raise ValueError(f"make_backend(): unknown teacher backend {teacher_cfg.backend!r}")
