"""The production teacher: vLLM teacher-forced with prompt log-probs.

One request per sequence: `SamplingParams(max_tokens=1, prompt_logprobs=K, detokenize=False,
flat_logprobs=True)`. vLLM's `prompt_logprobs[t + 1]` is the distribution over token t+1 given tokens
0..t, i.e. our row t. With `flat_logprobs=True` the result is a `vllm.logprobs.FlatLogprobs`: flat lists
`token_ids` / `logprobs` / `ranks`, and per prompt position a `start_indices[p]:end_indices[p]` span.
Layout, as vLLM 0.32 writes it (`append_logprobs_for_next_position`) and as the tests re-check:
position 0 is empty; every other position holds exactly K+1 entries: first the actual prompt token
(with its true rank, which may be anywhere), then the top-K in rank order 1..K (`torch.topk`, so K
distinct ids; the prompt token appears twice when it is in the top-K). So the K+1 entries of position
p start at (p - 1) * (K + 1), and the top-K of row t are flat entries [t*(K+1) + 1, (t+1)*(K+1)): one
list slice per run of consecutive stored rows, then one reshape, no per-token Python.

Engine processes: by default vLLM runs its engine core and worker in processes started with `spawn`,
which re-imports the caller's `__main__`: a script must create the backend under
`if __name__ == "__main__":` (pytest and console-script entry points already are). The front end (this
process) turns each step's tensors into FlatLogprobs in Python while the worker computes the next step.
`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps engine core and worker in this process instead (no spawn,
start-up in seconds instead of about a minute on 2 CPU cores; the tests use it).

On CPU: the worker binds its OpenMP threads to all cores but one (kept for the front end);
`gpu_memory_utilization` is a fraction of the NUMA node's memory, and `VLLM_CPU_KVCACHE_SPACE=<GiB>`
sets the KV cache size outright (and skips a warm-up pass).

Sampled rows: prompt log-probs hold only the top-K, so draws beyond the top-K's mass cannot be resolved
here: they stay -1 (a tail draw) and the cache records support 'top-K' (the HF backend resolves them).
"""

from __future__ import annotations

import array
import operator
import os

import numpy as np

from common.config import TeacherConfig
from stage1_teacher.backend import TopK, check_request, check_uniforms, empty_topk
from stage1_teacher.sampling import draws_from_topk

# Sampling seed: irrelevant to prompt log-probs (nothing is sampled that we keep), fixed for repeatability.
_ENGINE_SEED = 0


def engine_kwargs(cfg: TeacherConfig, model_path: str, k: int) -> dict:
    """`vllm.LLM(**kwargs)` for this teacher config."""
    kwargs = dict(
        model=model_path,
        revision=cfg.revision,
        dtype=cfg.dtype,
        quantization=cfg.quantization,
        tensor_parallel_size=cfg.tensor_parallel_size,
        # vLLM wants room for the one token it insists on generating after the prompt: +1, so that a
        # sequence of exactly max_model_len tokens is accepted, as with the hf backend.
        max_model_len=cfg.max_model_len + 1,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enforce_eager=cfg.enforce_eager,
        max_logprobs=k,  # vLLM refuses prompt_logprobs above this (default 20) rather than truncating
        trust_remote_code=cfg.trust_remote_code,
        seed=_ENGINE_SEED,
    )
    if cfg.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 1024**3)
    if cfg.enable_expert_parallel:  # only passed when set: older engines lack the argument
        kwargs["enable_expert_parallel"] = True
    return kwargs


def set_engine_env(cfg: TeacherConfig) -> None:
    """Environment the engine reads at start-up (its processes inherit it); call before `vllm.LLM`.
    teacher.batch_invariant sets VLLM_BATCH_INVARIANT=1 (UserError where `batch_invariant_blocker` says no)."""
    if not cfg.batch_invariant:
        return
    blocker = batch_invariant_blocker()
    if blocker:
        from common.errors import UserError

        raise UserError(f"teacher.batch_invariant: {blocker}")
    os.environ["VLLM_BATCH_INVARIANT"] = "1"


def batch_invariant_blocker() -> str | None:
    """Why vLLM's batch-invariant mode cannot run here (the reason and the way out, one line), or None.

    With VLLM_BATCH_INVARIANT=1, vLLM 0.32 swaps in batch-invariant kernels (matmul, softmax, reductions,
    attention split settings) so that a row does not depend on what it is batched with. Those kernels are
    CUDA/ROCm/XPU ones: on CPU the engine fails at start-up ("No Unquantized MoE backend supports the
    deployment configuration": the CPU experts, the only CPU MoE backend in fused_moe/oracle/unquantized.py,
    do not declare _supports_batch_invariance, which FusedMoEExperts.is_supported_config requires under the
    mode), so it is refused in one line instead."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    return ("vLLM's batch-invariant mode has no CPU kernels (its CPU MoE backend refuses it); set "
            "teacher.batch_invariant: false on CPU (vLLM offers it on NVIDIA GPUs of compute capability >= 8.0, "
            "AMD Instinct and Intel XPUs)")


def data_parallel_blocker() -> str | None:
    """Why the installed vLLM cannot run teacher.data_parallel_size > 1 on this machine, or None.

    vLLM 0.32's CPU engine starts the DP ranks (and splits the experts with expert parallelism), then fails
    at the first MoE step, with or without expert parallelism: with DP > 1 the MoE layer's prepare step
    (fused_moe/prepare_finalize/naive_dp_ep.py) gathers every rank's tokens through the EP group's
    all_gatherv (combine: reduce_scatterv), and the CPU communicator
    (distributed/device_communicators/cpu_communicator.py, CpuCommunicator) implements neither:
    DeviceCommunicatorBase's raise NotImplementedError. (Dense models are no way round it: vLLM refuses
    offline DP for them.) Probed on the installed classes, not inferred from the version number, so a vLLM
    whose CPU communicator gains them is let through."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.distributed.device_communicators.base_device_communicator import DeviceCommunicatorBase
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    missing = [name for name in ("all_gatherv", "reduce_scatterv")
               if getattr(CpuCommunicator, name) is getattr(DeviceCommunicatorBase, name)]
    if not missing:
        return None
    import vllm

    return (f"vLLM {vllm.__version__} on CPU cannot step data-parallel MoE ranks (its CpuCommunicator lacks "
            f"{' and '.join(missing)}, which the MoE layer's DP dispatch needs, with or without expert parallelism)")


def flat_to_topk(flat, positions: np.ndarray, k: int) -> TopK:
    """Rows `positions` (ascending) of one request's FlatLogprobs as rank-ordered [R, K] arrays (layout:
    module doc). Only the requested rows' entries are converted: with positions='assistant' most rows are
    skipped, and the conversion, not the model, dominated this step (BENCHMARKS.md, stage 1)."""
    if len(positions) == 0:
        return empty_topk(k)
    pos = np.asarray(positions, dtype=np.int64)
    width = k + 1  # entries per prompt position: the prompt token, then the top-K
    # The layout check, at the requested positions (row t = prompt position t + 1).
    if len(flat.start_indices) < pos[-1] + 2:
        raise RuntimeError(f"vLLM prompt log-probs: {len(flat.start_indices)} positions for row {pos[-1]}")
    spans = operator.itemgetter(*(pos + 1).tolist())
    starts = np.asarray(spans(flat.start_indices), dtype=np.int64).reshape(-1)
    ends = np.asarray(spans(flat.end_indices), dtype=np.int64).reshape(-1)
    if not (np.array_equal(starts, pos * width) and np.array_equal(ends, starts + width)):
        raise RuntimeError(
            f"vLLM prompt log-probs: expected {width} entries per position (prompt token + top-{k}); "
            "the engine's FlatLogprobs layout has changed"
        )
    # Python lists -> typed C arrays -> numpy views: about 2.5x faster than np.asarray on the lists
    # (C unsigned int and float are 32-bit: np.uintc, np.float32). float32 is exact: vLLM computed it so.
    # One slice per run of consecutive rows (an assistant turn), not per row.
    cut = np.flatnonzero(np.diff(pos) != 1) + 1
    ids_buf, lps_buf = array.array("I"), array.array("f")
    for first, last in zip(pos[np.r_[0, cut]].tolist(), pos[np.r_[cut - 1, len(pos) - 1]].tolist()):
        ids_buf.fromlist(flat.token_ids[first * width : (last + 1) * width])
        lps_buf.fromlist(flat.logprobs[first * width : (last + 1) * width])
    # [R, K+1] -> minus column 0 (the prompt token itself).
    ids = np.frombuffer(ids_buf, dtype=np.uintc).reshape(len(pos), width)[:, 1:].astype(np.uint32, copy=False)
    lps = np.frombuffer(lps_buf, dtype=np.float32).reshape(len(pos), width)[:, 1:]
    if np.any(lps[:, 1:] > lps[:, :-1]):
        raise RuntimeError("vLLM prompt log-probs: top-K entries are not in rank order")
    return TopK(np.ascontiguousarray(ids), np.ascontiguousarray(lps))


class VllmBackend:
    def __init__(self, cfg: TeacherConfig, model_path: str, k: int, llm=None):
        """llm: score on this running `vllm.LLM` (made for the same cfg and k) instead of starting one; close()
        then stops it too (the capture benchmark runs both paths on one engine)."""
        import vllm
        from vllm import SamplingParams

        self.k = k
        self.engine_version = f"vllm=={vllm.__version__}"
        self.max_model_len = cfg.max_model_len
        if llm is None:
            set_engine_env(cfg)
            llm = vllm.LLM(**engine_kwargs(cfg, model_path, k))
        self._llm = llm
        self.vocab_size = self._llm.llm_engine.model_config.get_vocab_size()
        self._params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)

    def score(self, sequences: list[np.ndarray], positions: list[np.ndarray],
              uniforms: list[np.ndarray] | None = None) -> list[TopK]:
        from vllm.inputs import TokensPrompt

        positions = check_request(sequences, positions, self.max_model_len, self.vocab_size)
        uniforms = check_uniforms(uniforms, positions)
        wanted = [i for i, pos in enumerate(positions) if len(pos)]
        # Row t needs tokens 0..t+1 (t+1 only as vLLM's "prompt token"): later tokens are not sent.
        prompts = [
            TokensPrompt(prompt_token_ids=np.asarray(sequences[i][: positions[i][-1] + 2]).tolist()) for i in wanted
        ]
        outputs = self._llm.generate(prompts, self._params, use_tqdm=False) if prompts else []
        by_index = dict(zip(wanted, outputs))  # LLM.generate returns outputs in request order
        results = [
            flat_to_topk(by_index[i].prompt_logprobs, pos, self.k) if i in by_index else empty_topk(self.k)
            for i, pos in enumerate(positions)
        ]
        if uniforms is None:
            return results
        return [TopK(t.ids, t.logprobs, draws_from_topk(t.ids, t.logprobs, u)) for t, u in zip(results, uniforms)]

    def close(self) -> None:
        """Stop the engine core and worker processes and free the KV cache."""
        if self._llm is not None:
            shutdown_engine(self._llm)
            self._llm = None


def shutdown_engine(llm) -> None:
    """Stop a `vllm.LLM`'s engine core and worker processes and free its KV cache."""
    llm.llm_engine.engine_core.shutdown()
