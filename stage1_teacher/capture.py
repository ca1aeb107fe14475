"""Stage 1 inside vLLM's workers: the cache's rows computed where the hidden states are, no per-token Python.

vLLM makes prompt log-probs in `GPUModelRunner._get_prompt_logprobs_dict` (the CPU runner inherits it): per
request and prefill chunk, lm_head over every prompt position, a full fp32 log-softmax over the vocabulary,
top-K, then a copy to the host that the front end turns into Python lists (its own comment: "a rare
feature"). `CaptureWorkerExtension` (vLLM's `worker_extension_cls`, installed with `LLM.collective_rpc`)
replaces that method on the worker's model runner. For a request that carries `extra_args[CAPTURE_KEY]` it
computes, only at the request's stored positions and `chunk_rows` rows at a time:
    logits [c, V] = lm_head(hidden) (the engine's own compute_logits), lse = logsumexp(logits) [c],
    top-K ids and logits - lse [c, K], and with uniforms the N draws of each row from the FULL softmax:
    inverse CDF over the top-K (sampling.draws_from_topk), then the draws beyond the top-K's mass resolved
    exactly while the chunk's logits exist (hf_backend.resolve_tail_draws, the reference's own code).
A [T, V] log-softmax never exists; the request's prompt-log-prob output is left empty, so the front end
has nothing to convert.

Data plane (vLLM's advice: RPC for control, your own channel for data): a directory the job owns (on
/dev/shm where there is one). The driver writes `<key>.request.safetensors` (positions int64 [R], and
uniforms float64 [R, N] for sampled rows); the worker that holds the full logits (TP rank 0 of the last
pipeline stage) writes `<key>.rows.safetensors` (ids uint32 [R, K], logprobs float32 [R, K], draws int64
[R, N]) atomically (temporary name, then rename) in the engine step that computes the request's last stored
row, i.e. before the engine reports the request finished. Requests without the key (none in stage 1) go to
vLLM's own method unchanged.

Written against vLLM 0.32's model runner (SUPPORTED_VLLM); `check_runner` refuses a runner that lacks what
this module touches, and the driver refuses other versions before starting an engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from stage1_teacher.hf_backend import resolve_tail_draws
from stage1_teacher.sampling import draws_from_topk

SUPPORTED_VLLM = ("0.32.",)
"""vLLM versions (prefixes) whose GPUModelRunner internals this module was written and tested against."""

CAPTURE_KEY = "hyperdistill_capture"
"""SamplingParams.extra_args key: the request's file stem in the capture directory."""

_RUNNER_ATTRS = ("_get_prompt_logprobs_dict", "num_prompt_logprobs", "requests", "input_batch", "query_start_loc",
                 "model")


def request_file(directory: str, key: str) -> str:
    return os.path.join(directory, f"{key}.request.safetensors")


def rows_file(directory: str, key: str) -> str:
    return os.path.join(directory, f"{key}.rows.safetensors")


def check_runner(runner) -> None:
    missing = [a for a in _RUNNER_ATTRS if not hasattr(runner, a)]
    if missing:
        raise RuntimeError(f"engine capture: vLLM's model runner {type(runner).__name__} lacks {', '.join(missing)}; "
                           "this vLLM is not one the capture supports (teacher.capture: public works with any)")


@dataclass
class _Request:
    """One captured request while its prefill runs: where its rows go."""

    key: str
    positions: np.ndarray  # int64 [R], ascending
    uniforms: np.ndarray | None  # float64 [R, N]
    ids: np.ndarray  # uint32 [R, K]
    logprobs: np.ndarray  # float32 [R, K]
    draws: np.ndarray | None  # int64 [R, N]


class Capture:
    """The replacement for one model runner's `_get_prompt_logprobs_dict` (module doc)."""

    def __init__(self, runner, directory: str, k: int, chunk_rows: int, writes: bool):
        check_runner(runner)
        self.runner = runner
        self.directory = directory
        self.k = k
        self.chunk_rows = chunk_rows
        self.writes = writes  # only the rank whose compute_logits returns the full logits writes files
        self.original = runner._get_prompt_logprobs_dict
        self.active: dict[str, _Request] = {}

    def _key(self, req_id: str) -> str | None:
        params = self.runner.requests[req_id].sampling_params
        extra = params.extra_args if params is not None else None
        return extra.get(CAPTURE_KEY) if extra else None

    def _open(self, req_id: str, key: str) -> _Request:
        from safetensors.numpy import load_file

        arrays = load_file(request_file(self.directory, key))
        pos = arrays["positions"].astype(np.int64, copy=False)
        u = arrays.get("uniforms")
        state = _Request(key, pos, u, np.zeros((len(pos), self.k), np.uint32), np.zeros((len(pos), self.k), np.float32),
                         None if u is None else np.zeros(u.shape, np.int64))
        self.active[req_id] = state
        return state

    def __call__(self, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]) -> dict:
        runner = self.runner
        ours = {r: key for r in runner.num_prompt_logprobs if (key := self._key(r)) is not None}
        out = self._theirs(hidden_states, num_scheduled_tokens, ours)
        # Gather this step's stored rows of every captured request into one index, so lm_head runs on
        # full chunks rather than once per request.
        index, spans, finished = [], [], []
        for req_id, key in ours.items():
            n = num_scheduled_tokens.get(req_id)
            if n is None:  # not scheduled this step (e.g. preempted)
                continue
            state = self.active.get(req_id) or self._open(req_id, key)
            start = runner.requests[req_id].num_computed_tokens  # first prompt position of this chunk
            lo, hi = np.searchsorted(state.positions, [start, start + n])
            if hi > lo:
                offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
                index.append(state.positions[lo:hi] - start + offset)
                spans.append((state, int(lo), int(hi)))
            if start + n > state.positions[-1]:  # its last stored row is in this step
                finished.append(req_id)
        if index:
            self._rows(hidden_states, np.concatenate(index), spans)
        for req_id in finished:
            state = self.active.pop(req_id)
            del runner.num_prompt_logprobs[req_id]  # as vLLM's own method does once a prefill is complete
            if self.writes:
                self._write(state)
        return out

    def _theirs(self, hidden_states, num_scheduled_tokens, ours) -> dict:
        """vLLM's own prompt log-probs for requests that are not captured (stage 1 sends none)."""
        runner = self.runner
        theirs = {r: n for r, n in runner.num_prompt_logprobs.items() if r not in ours}
        if not theirs:
            return {}
        everyone = runner.num_prompt_logprobs
        runner.num_prompt_logprobs = theirs
        try:
            return self.original(hidden_states, num_scheduled_tokens)
        finally:  # vLLM deleted the ones it completed from `theirs`
            runner.num_prompt_logprobs = everyone
            for r in [r for r in everyone if r not in ours and r not in theirs]:
                del everyone[r]

    @torch.inference_mode()
    def _rows(self, hidden_states: torch.Tensor, index: np.ndarray, spans: list) -> None:
        """lm_head + logsumexp + top-K (+ draws) over the gathered rows, chunk by chunk, into the requests'
        host arrays."""
        rows = hidden_states.index_select(0, torch.from_numpy(index).to(hidden_states.device))  # [R, H]
        ids = np.empty((len(index), self.k), np.uint32)
        lps = np.empty((len(index), self.k), np.float32)
        with_uniforms = {state.uniforms is not None for state, _, _ in spans}
        if len(with_uniforms) > 1:
            raise RuntimeError("engine capture: sampled and top-K requests in one engine step")
        uniforms = (np.concatenate([state.uniforms[lo:hi] for state, lo, hi in spans]) if True in with_uniforms
                    else None)
        draws = None if uniforms is None else np.empty(uniforms.shape, np.int64)
        for a in range(0, len(index), self.chunk_rows):
            b = min(a + self.chunk_rows, len(index))
            # Every rank calls compute_logits: with tensor parallelism it gathers the vocabulary shards.
            logits = self.runner.model.compute_logits(rows[a:b])  # [c, V] in the model dtype
            if logits is None or not self.writes:  # a rank whose rows nobody reads
                continue
            x = logits.float()
            lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [c, 1]; no [c, V] log-softmax is kept
            top_vals, top_ids = torch.topk(x, self.k, dim=-1)  # [c, K], best first
            ids[a:b] = top_ids.cpu().numpy()
            lps[a:b] = (top_vals - lse).cpu().numpy()
            if draws is not None:
                first = draws_from_topk(ids[a:b], lps[a:b], uniforms[a:b])
                draws[a:b] = resolve_tail_draws(x, ids[a:b], lps[a:b], uniforms[a:b], first)
        at = 0
        for state, lo, hi in spans:
            n = hi - lo
            state.ids[lo:hi], state.logprobs[lo:hi] = ids[at : at + n], lps[at : at + n]
            if state.draws is not None:
                state.draws[lo:hi] = draws[at : at + n]
            at += n

    def _write(self, state: _Request) -> None:
        from safetensors.numpy import save_file

        arrays = {"ids": state.ids, "logprobs": state.logprobs}
        if state.draws is not None:
            arrays["draws"] = state.draws
        final = rows_file(self.directory, state.key)
        save_file(arrays, final + ".tmp")
        os.replace(final + ".tmp", final)  # the driver never sees a half-written file


class CaptureWorkerExtension:
    """Methods added to every vLLM worker (`LLM(worker_extension_cls=...)`); called by `LLM.collective_rpc`."""

    def hyperdistill_install_capture(self, directory: str, k: int, chunk_rows: int) -> str:
        """Replace the model runner's prompt-log-prob method by Capture; returns the runner's class name."""
        runner = self.model_runner
        writes = True
        try:  # with tensor or pipeline parallelism only one worker holds the full logits
            from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

            writes = get_tensor_model_parallel_rank() == 0 and get_pp_group().is_last_rank
        except (ImportError, AssertionError):
            pass
        runner._get_prompt_logprobs_dict = Capture(runner, directory, k, chunk_rows, writes)
        return type(runner).__name__
