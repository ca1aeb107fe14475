"""How top-K log-probs are stored: an `Encoding` maps float32 [R, K] log-probs to a stored array and back,
with a stated worst-case error, so that tighter codes can be added next to fp16 without touching the writer,
reader or verifier (they only call `encode`, `decode` and `error_bound`).

An encoding must keep rank order (a non-increasing row stays non-increasing) and never decode to a value
above 0: the verifier checks both on decoded values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from common.errors import UserError


@dataclass(frozen=True)
class Encoding(ABC):
    name: str
    """The name recorded in the cache's root metadata ('encoding')."""
    dtype: np.dtype
    """dtype of the stored array."""
    min_value: float
    """Most negative log-prob the encoding represents; the writer refuses smaller values."""

    @abstractmethod
    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        """float32 [R, K] log-probs (<= 0) -> stored array of `dtype`, same shape."""

    @abstractmethod
    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored array -> float32 [R, K] log-probs."""

    @abstractmethod
    def error_bound(self, logprobs: np.ndarray) -> np.ndarray:
        """Worst-case |decode(encode(x)) - x| for each x in [min_value, 0] (float32, same shape). It also
        bounds |x - d| for every x that decodes to d when called on d itself, which is how verify uses it."""


@dataclass(frozen=True)
class Fp16Encoding(Encoding):
    """IEEE half precision: round to nearest, so the error is half a unit in the last place: at most
    |x| * 2**-11 for normal values and 2**-25 in the subnormal range (|x| < 2**-14)."""

    name: str = "fp16"
    dtype: np.dtype = np.dtype(np.float16)
    min_value: float = float(np.finfo(np.float16).min)  # -65504

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        # Values in (0, writer tolerance] come from float error in the teacher's log-softmax: store them as 0.
        return np.minimum(logprobs, 0.0, dtype=np.float32).astype(np.float16)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return stored.astype(np.float32)

    def error_bound(self, logprobs: np.ndarray) -> np.ndarray:
        x = np.abs(np.asarray(logprobs, dtype=np.float32))
        return x * np.float32(2.0**-11) + np.float32(2.0**-25)


ENCODINGS: dict[str, Encoding] = {e.name: e for e in (Fp16Encoding(),)}


def get_encoding(name: str) -> Encoding:
    """The registered encoding called `name`; UserError naming the known ones otherwise."""
    try:
        return ENCODINGS[name]
    except KeyError:
        raise UserError(f"unknown log-prob encoding {name!r}; known: {', '.join(sorted(ENCODINGS))}") from None
