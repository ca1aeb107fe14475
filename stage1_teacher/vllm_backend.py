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
reshape and one slice, no per-token Python.

Engine processes: by default vLLM runs its engine core and worker in processes started with `spawn`,
which re-imports the caller's `__main__`: a script must create the backend under
`if __name__ == "__main__":` (pytest and console-script entry points already are). The front end (this
process) turns each step's tensors into FlatLogprobs in Python while the worker computes the next step.
`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps engine core and worker in this process instead (no spawn,
start-up in seconds instead of about a minute on 2 CPU cores; the tests use it).
On CPU: the worker binds its OpenMP threads to all cores but one (kept for the front end);
`gpu_memory_utilization` is a fraction of the NUMA node's memory, and `VLLM_CPU_KVCACHE_SPACE=<GiB>`
sets the KV cache size outright (and skips a warm-up pass).
"""

from __future__ import annotations

import array

import numpy as np

from common.config import TeacherConfig
from stage1_teacher.backend import TopK, check_request, empty_topk

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


def flat_to_topk(flat, positions: np.ndarray, k: int) -> TopK:
    """Rows `positions` of one request's FlatLogprobs as rank-ordered [R, K] arrays (layout: module doc)."""
    if len(positions) == 0:
        return empty_topk(k)
    n_rows = positions[-1] + 1  # rows 0..n_rows-1 = prompt positions 1..n_rows
    n_flat = n_rows * (k + 1)
    starts = np.asarray(flat.start_indices[1 : n_rows + 1], dtype=np.int64)
    ends = np.asarray(flat.end_indices[1 : n_rows + 1], dtype=np.int64)
    expected = np.arange(n_rows, dtype=np.int64) * (k + 1)
    if len(starts) != n_rows or not (np.array_equal(starts, expected) and np.array_equal(ends, expected + k + 1)):
        raise RuntimeError(
            f"vLLM prompt log-probs: expected {k + 1} entries per position (prompt token + top-{k}); "
            "the engine's FlatLogprobs layout has changed"
        )
    # Python lists -> typed C arrays -> numpy views: about 2.5x faster than np.asarray on the lists
    # (C unsigned int and float are 32-bit: np.uintc, np.float32). float32 is exact: vLLM computed it so.
    ids = np.frombuffer(array.array("I", flat.token_ids[:n_flat]), dtype=np.uintc)
    lps = np.frombuffer(array.array("f", flat.logprobs[:n_flat]), dtype=np.float32)
    # [n_rows, K+1] -> the requested rows, minus column 0 (the prompt token itself).
    ids = ids.reshape(n_rows, k + 1)[positions, 1:].astype(np.uint32, copy=False)
    lps = lps.reshape(n_rows, k + 1)[positions, 1:]
    if np.any(lps[:, 1:] > lps[:, :-1]):
        raise RuntimeError("vLLM prompt log-probs: top-K entries are not in rank order")
    return TopK(np.ascontiguousarray(ids), np.ascontiguousarray(lps))


class VllmBackend:
    def __init__(self, cfg: TeacherConfig, model_path: str, k: int):
        import vllm
        from vllm import SamplingParams

        self.k = k
        self.engine_version = f"vllm=={vllm.__version__}"
        self.max_model_len = cfg.max_model_len
        self._llm = vllm.LLM(**engine_kwargs(cfg, model_path, k))
        self.vocab_size = self._llm.llm_engine.model_config.get_vocab_size()
        self._params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)

    def score(self, sequences: list[np.ndarray], positions: list[np.ndarray]) -> list[TopK]:
        from vllm.inputs import TokensPrompt

        positions = check_request(sequences, positions, self.max_model_len, self.vocab_size)
        wanted = [i for i, pos in enumerate(positions) if len(pos)]
        # Row t needs tokens 0..t+1 (t+1 only as vLLM's "prompt token"): later tokens are not sent.
        prompts = [
            TokensPrompt(prompt_token_ids=np.asarray(sequences[i][: positions[i][-1] + 2]).tolist()) for i in wanted
        ]
        outputs = self._llm.generate(prompts, self._params, use_tqdm=False) if prompts else []
        by_index = dict(zip(wanted, outputs))  # LLM.generate returns outputs in request order
        return [
            flat_to_topk(by_index[i].prompt_logprobs, pos, self.k) if i in by_index else empty_topk(self.k)
            for i, pos in enumerate(positions)
        ]

    def close(self) -> None:
        """Stop the engine core and worker processes and free the KV cache."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
