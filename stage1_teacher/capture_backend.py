"""The production teacher with `teacher.capture: engine`: vLLM computes the cache's rows in its workers.

The engine is the same `vllm.LLM` as the public path's (vllm_backend.engine_kwargs), started with
`worker_extension_cls` = stage1_teacher.capture.CaptureWorkerExtension; one `collective_rpc` then installs the
capture on every worker (what runs there, and the file layout of the data plane: stage1_teacher.capture).

Per score() call, each request gets a key; its positions (and uniforms) go to the job's capture directory,
the request to the engine as `SamplingParams(max_tokens=1, prompt_logprobs=0, extra_args={CAPTURE_KEY: key})`
(prompt_logprobs set, so that vLLM hands the worker the prompt's hidden states; 0, so that even its public
output would be one entry per position), and after `generate` returns the rows are read back as arrays. The
driver process handles one file per request, never a Python object per token.

Sampled rows are exact here (support 'full'): the worker resolves draws beyond the top-K from the full logits,
as the HF reference does. The vLLM version is checked before the engine starts (SUPPORTED_VLLM).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile

import numpy as np

from common.config import TeacherConfig
from common.errors import UserError
from stage1_teacher.backend import TopK, check_request, check_uniforms, empty_topk
from stage1_teacher.capture import CAPTURE_KEY, SUPPORTED_VLLM, request_file, rows_file
from stage1_teacher.vllm_backend import engine_kwargs, set_engine_env, shutdown_engine

EXTENSION = "stage1_teacher.capture.CaptureWorkerExtension"


def check_vllm_version(version: str) -> None:
    """One line naming the way out when the installed vLLM is not one the capture was written against."""
    if not version.startswith(SUPPORTED_VLLM):
        raise UserError(
            f"teacher.capture: engine supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)} (installed: "
            f"{version}); set teacher.capture: public to use vLLM's public prompt-log-prob path"
        )


def capture_dir() -> str:
    """A fresh directory this job owns for the data plane: in memory (/dev/shm) where there is one."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="hyperdistill-capture-", dir=base)


class CaptureBackend:
    def __init__(self, cfg: TeacherConfig, model_path: str, k: int):
        import vllm

        check_vllm_version(vllm.__version__)
        set_engine_env(cfg)
        self.k = k
        self.engine_version = f"vllm=={vllm.__version__} capture=engine"
        self.max_model_len = cfg.max_model_len
        self._dir = capture_dir()
        self._keys = itertools.count()
        self._llm = None
        try:
            self._llm = vllm.LLM(**engine_kwargs(cfg, model_path, k), worker_extension_cls=EXTENSION)
            self._llm.collective_rpc("hyperdistill_install_capture", args=(self._dir, k, cfg.chunk_rows))
        except BaseException:
            self.close()
            raise
        self.vocab_size = self._llm.llm_engine.model_config.get_vocab_size()

    def score(self, sequences: list[np.ndarray], positions: list[np.ndarray],
              uniforms: list[np.ndarray] | None = None) -> list[TopK]:
        from safetensors.numpy import load_file, save_file
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        positions = check_request(sequences, positions, self.max_model_len, self.vocab_size)
        uniforms = check_uniforms(uniforms, positions)
        wanted = [i for i, pos in enumerate(positions) if len(pos)]
        keys = {i: f"r{next(self._keys)}" for i in wanted}
        prompts, params = [], []
        for i in wanted:
            request = {"positions": positions[i]}
            if uniforms is not None:
                request["uniforms"] = uniforms[i]
            save_file(request, request_file(self._dir, keys[i]))
            # The same prompt as the public path (row t needs tokens 0..t; t+1 is vLLM's "prompt token").
            prompts.append(TokensPrompt(prompt_token_ids=np.asarray(sequences[i][: positions[i][-1] + 2]).tolist()))
            params.append(SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True,
                                         extra_args={CAPTURE_KEY: keys[i]}))
        if prompts:
            self._llm.generate(prompts, params, use_tqdm=False)
        n_draws = None if uniforms is None else uniforms[0].shape[1]
        results = []
        for i in range(len(positions)):
            if i not in keys:
                results.append(empty_topk(self.k, n_draws))
                continue
            path = rows_file(self._dir, keys[i])
            if not os.path.exists(path):
                raise RuntimeError(f"engine capture: the worker wrote no rows for request {keys[i]} ({path})")
            rows = load_file(path)
            os.remove(path)
            os.remove(request_file(self._dir, keys[i]))
            results.append(TopK(rows["ids"], rows["logprobs"], rows.get("draws")))
        return results

    def close(self) -> None:
        """Stop the engine and remove the capture directory."""
        if self._llm is not None:
            shutdown_engine(self._llm)
            self._llm = None
        shutil.rmtree(self._dir, ignore_errors=True)
