"""The reference teacher: a plain transformers forward, top-K taken only at the stored positions.

The decoder runs once per sequence (no padding, so no masking subtleties); lm_head then runs only on the
hidden states of the stored positions, `chunk_rows` rows at a time, each chunk reduced to logsumexp and
top-K at once. A [T, vocab] fp32 log-softmax (0.6 MB per token at the Qwen vocabulary) never exists.

Sampled rows (uniforms given): each row's draws are first made over its top-K (sampling.draws_from_topk,
as the vLLM backend does), then every draw beyond the top-K's mass is resolved exactly while the chunk's
[c, V] logits exist (`resolve_tail_draws`), so the HF backend's draws are samples from the full p.
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import TeacherConfig
from stage1_teacher.backend import TopK, check_request, check_uniforms, empty_topk
from stage1_teacher.sampling import TAIL_DRAW, draws_from_topk

# Rows resolved at once by resolve_tail_draws: three [32, V] float64 temporaries, 39 MB each at V=151,936.
TAIL_BLOCK_ROWS = 32


def resolve_tail_draws(logits: torch.Tensor, top_ids: np.ndarray, top_logprobs: np.ndarray, uniforms: np.ndarray,
                       draws: np.ndarray) -> np.ndarray:
    """Replace every TAIL_DRAW in draws [c, N] (made by draws_from_topk from top_ids / top_logprobs [c, K] and
    uniforms [c, N]) by an exact draw from the rest of the vocabulary: the conditional draw among the ids
    outside the row's top-K with u' = (u - top-K mass) / tail mass, by inverse CDF over those ids in id
    order, in float64. logits: [c, V] float32 of the same rows, on any device (the HF backend's CPU, or a
    vLLM worker's GPU for the engine capture: the [b, V] work stays there, only [b, N] picks come back).
    Returns draws (changed in place)."""
    need = np.flatnonzero((draws == TAIL_DRAW).any(axis=1))
    dev = logits.device
    for a in range(0, len(need), TAIL_BLOCK_ROWS):
        rows = need[a : a + TAIL_BLOCK_ROWS]
        x = logits[torch.from_numpy(rows).to(dev)].double()  # [b, V]
        p = torch.exp(x - torch.logsumexp(x, dim=-1, keepdim=True))
        p.scatter_(1, torch.from_numpy(top_ids[rows].astype(np.int64)).to(dev), 0.0)  # the rest of the vocabulary
        cdf = torch.cumsum(p, dim=-1)  # [b, V], id order
        tail = cdf[:, -1:].cpu().numpy()  # [b, 1]
        # The top-K mass exactly as draws_from_topk summed it, so that u splits at the same point.
        top_mass = np.cumsum(np.exp(top_logprobs[rows].astype(np.float64)), axis=1)[:, -1:]
        u = np.clip((uniforms[rows] - top_mass) / np.maximum(1.0 - top_mass, 1e-300), 0.0, np.nextafter(1.0, 0.0))
        # The first id whose CDF exceeds u' * tail: it has mass (so it is not a top-K id), unless rounding put
        # u' * tail at the CDF's end (index V): then the last id that has mass.
        picked = torch.searchsorted(cdf, torch.from_numpy(u * tail).to(dev), right=True).cpu().numpy()  # [b, N]
        for r, c in zip(*np.nonzero(picked >= p.shape[1])):
            rest = torch.nonzero(p[r] > 0)
            # Nothing outside the top-K has mass (K = the vocabulary): u passed the top-K's summed mass only by
            # float rounding, so the draw is the top-K's last entry.
            picked[r, c] = int(rest[-1]) if len(rest) else int(top_ids[rows[r], -1])
        block = draws[rows]
        tail_draws = block == TAIL_DRAW
        block[tail_draws] = picked[tail_draws]
        draws[rows] = block
    return draws


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
    def score(self, sequences: list[np.ndarray], positions: list[np.ndarray],
              uniforms: list[np.ndarray] | None = None) -> list[TopK]:
        positions = check_request(sequences, positions, self.max_model_len, self.vocab_size)
        uniforms = check_uniforms(uniforms, positions)
        return [self._score_one(np.asarray(seq), pos, None if uniforms is None else uniforms[i])
                for i, (seq, pos) in enumerate(zip(sequences, positions))]

    def _score_one(self, seq: np.ndarray, pos: np.ndarray, uniforms: np.ndarray | None) -> TopK:
        if len(pos) == 0:
            return empty_topk(self.k, None if uniforms is None else uniforms.shape[1])
        # Row t needs tokens 0..t only: the tokens after the last stored position are never read.
        ids = torch.from_numpy(seq[: pos[-1] + 1].astype(np.int64))[None]  # [1, T]
        hidden = self._decoder(input_ids=ids, use_cache=False).last_hidden_state[0]  # [T, H]
        rows = hidden[torch.from_numpy(pos)]  # [R, H]
        out_ids = np.empty((len(pos), self.k), dtype=np.uint32)
        out_lps = np.empty((len(pos), self.k), dtype=np.float32)
        out_draws = None if uniforms is None else np.empty(uniforms.shape, dtype=np.int64)
        for start in range(0, len(pos), self.chunk_rows):
            stop = start + self.chunk_rows
            logits = self._lm_head(rows[start:stop]).float()  # [c, V], the only full-vocab tensor
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [c, 1]
            top_vals, top_ids = torch.topk(logits, self.k, dim=-1)  # [c, K], sorted best first
            out_ids[start:stop] = top_ids.numpy()
            out_lps[start:stop] = (top_vals - lse).numpy()
            if out_draws is not None:
                u = uniforms[start:stop]
                drawn = draws_from_topk(out_ids[start:stop], out_lps[start:stop], u)
                out_draws[start:stop] = resolve_tail_draws(logits, out_ids[start:stop], out_lps[start:stop], u, drawn)
        return TopK(out_ids, out_lps, out_draws)

    def close(self) -> None:
        self._decoder = self._lm_head = None
