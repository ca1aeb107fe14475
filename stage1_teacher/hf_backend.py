"""The reference teacher: a plain transformers forward, top-K taken only at the stored positions.

The decoder runs once per sequence (no padding, so no masking subtleties); lm_head then runs only on the
hidden states of the stored positions, `chunk_rows` rows at a time, each chunk reduced to logsumexp and
top-K at once. A [T, vocab] fp32 log-softmax (0.6 MB per token at the Qwen vocabulary) never exists.
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import TeacherConfig
from stage1_teacher.backend import TopK, check_request, empty_topk


class HfBackend:
    def __init__(self, cfg: TeacherConfig, model_path: str, k: int):
        import transformers
        from transformers import AutoModelForCausalLM

        self.k = k
        self.engine_version = f"transformers=={transformers.__version__}"
        self.max_model_len = cfg.max_model_len
        self.chunk_rows = cfg.chunk_rows
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            revision=cfg.revision,
            dtype=getattr(torch, cfg.dtype),
            trust_remote_code=cfg.trust_remote_code,
        ).eval()
        self.vocab_size = model.config.vocab_size
        # The decoder stack (final norm included) and the output projection, called separately so that
        # the projection only sees the stored positions.
        self._decoder = model.base_model
        self._lm_head = model.get_output_embeddings()
        if k > self.vocab_size:
            raise ValueError(f"hf backend: k={k} exceeds the vocabulary ({self.vocab_size})")

    @torch.inference_mode()
    def score(self, sequences: list[np.ndarray], positions: list[np.ndarray]) -> list[TopK]:
        positions = check_request(sequences, positions, self.max_model_len, self.vocab_size)
        return [self._score_one(np.asarray(seq), pos) for seq, pos in zip(sequences, positions)]

    def _score_one(self, seq: np.ndarray, pos: np.ndarray) -> TopK:
        if len(pos) == 0:
            return empty_topk(self.k)
        # Row t needs tokens 0..t only: the tokens after the last stored position are never read.
        ids = torch.from_numpy(seq[: pos[-1] + 1].astype(np.int64))[None]  # [1, T]
        hidden = self._decoder(input_ids=ids, use_cache=False).last_hidden_state[0]  # [T, H]
        rows = hidden[torch.from_numpy(pos)]  # [R, H]
        out_ids = np.empty((len(pos), self.k), dtype=np.uint32)
        out_lps = np.empty((len(pos), self.k), dtype=np.float32)
        for start in range(0, len(pos), self.chunk_rows):
            stop = start + self.chunk_rows
            logits = self._lm_head(rows[start:stop]).float()  # [c, V], the only full-vocab tensor
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [c, 1]
            top_vals, top_ids = torch.topk(logits, self.k, dim=-1)  # [c, K], sorted best first
            out_ids[start:stop] = top_ids.numpy()
            out_lps[start:stop] = (top_vals - lse).numpy()
        return TopK(out_ids, out_lps)

    def close(self) -> None:
        self._decoder = self._lm_head = None
