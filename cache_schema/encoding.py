"""How top-K log-probs are stored: an `Encoding` maps float32 log-probs to stored codes and back, with a
stated worst-case error, so that the writer, reader and verifier never depend on one code (they call
`encode`, `decode` and `bin_halfwidth` / `error_bound`; the row layout around them is `cache_schema.topk_rows`).

Encodings, by the name recorded in the cache's root metadata ('encoding'):

  fp16     IEEE half precision, one value per entry. Rounding error |x| * 2**-11 (+ 2**-25 near 0).
  qlog8    log-probs quantised on a uniform grid of 2**-8 nats. Rounding error <= 2**-9 nats.
  qlog5    the same with 2**-5 nats. Rounding error <= 2**-6 nats.
  qsqrt5   2**-5 nats down to -4 nats, then a grid uniform in sqrt(p) (each bin costs about the same KL,
           so unlikely tokens get coarser bins), the step capped at 2 nats (from -12.32 nats, p < 4.5e-6, on).
           Rounding error <= min(1, 1.4 * 2**-6 * max(1, exp((|x| - 4) / 2))) nats: 2**-6 near 0 (the 1.4
           covers bins that straddle -4 or grow within themselves), 1 nat below -12.32.

The quantised ('q') encodings store integer codes (0 = log-prob 0, growing as the log-prob falls), so a row
in rank order has non-decreasing codes: `cache_schema.topk_rows` stores the first code and the differences,
which are small and non-negative, and entries whose codes tie are stored in ascending order of their
id-table symbols (their teacher order is below the encoding's resolution).

`stated_bound(x)` is the rounding error each encoding promises (the formulas above); `bin_halfwidth(code)`
is the exact worst case over every value that lands in a code's bin, so it bounds the truth from the stored
code alone (this is how verify uses it). Rows stored with their exact mass (the q encodings, and fp16 with
mass-adaptive K; see cache_schema.format) are renormalised on read by one shift per row, which moves every
value of the row by at most the largest rounding error in the row; `rows.DecodedRows.error_bound` states
the total per value:

    |decoded - true| <= bin_halfwidth(code) + |shift of the row| + float32 rounding
                     <= 2 * (largest stated_bound in the row) + float32 rounding

An encoding never decodes above 0 and keeps rank order (non-increasing rows stay non-increasing).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from common.errors import UserError

FP16_MIN = float(np.finfo(np.float16).min)  # -65504: the most negative log-prob any encoding stores


@dataclass(frozen=True)
class Encoding(ABC):
    name: str
    """The name recorded in the cache's root metadata ('encoding')."""
    dtype: np.dtype
    """dtype of the stored log-prob codes."""
    min_value: float
    """Most negative log-prob the encoding represents; the writer refuses smaller values."""
    delta_coded: bool
    """Codes are integers that rank order makes non-decreasing: rows store them (and the ids) as differences
    along the row, ties in id order (see cache_schema.topk_rows)."""

    @abstractmethod
    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        """float32 log-probs (<= 0; values in (0, writer tolerance] are float noise, stored as 0), any shape
        -> codes of `dtype`, same shape."""

    @abstractmethod
    def decode(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Codes (any integer dtype for the q encodings) -> float32 log-probs, same shape (into `out` if
        given: a float32 array of that shape)."""

    @abstractmethod
    def bin_halfwidth(self, codes: np.ndarray) -> np.ndarray:
        """float32, same shape: the most any log-prob that encodes to `codes` differs from decode(codes)."""

    @abstractmethod
    def stated_bound(self, logprobs: np.ndarray) -> np.ndarray:
        """The documented worst-case rounding error at each log-prob (float64, same shape)."""

    def error_bound(self, logprobs: np.ndarray) -> np.ndarray:
        """Worst-case rounding error |decode(encode(x)) - x| for values x in [min_value, 0] (float32, same
        shape). It also bounds |x - d| for every x that decodes to d when called on d itself."""
        return self.bin_halfwidth(self.encode(np.asarray(logprobs, dtype=np.float32)))


@dataclass(frozen=True)
class Fp16Encoding(Encoding):
    """IEEE half precision: round to nearest, so the error is half a unit in the last place: at most
    |x| * 2**-11 for normal values and 2**-25 in the subnormal range (|x| < 2**-14)."""

    name: str = "fp16"
    dtype: np.dtype = np.dtype(np.float16)
    min_value: float = FP16_MIN
    delta_coded: bool = False

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        return np.minimum(logprobs, 0.0, dtype=np.float32).astype(np.float16)

    def decode(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return codes.astype(np.float32)
        np.copyto(out, codes)  # float16 -> float32 is exact
        return out

    def bin_halfwidth(self, codes: np.ndarray) -> np.ndarray:
        return self.error_bound(codes.astype(np.float32))

    def error_bound(self, logprobs: np.ndarray) -> np.ndarray:
        x = np.abs(np.asarray(logprobs, dtype=np.float32))
        return x * np.float32(2.0**-11) + np.float32(2.0**-25)

    def stated_bound(self, logprobs: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(logprobs, dtype=np.float64)) * 2.0**-11 + 2.0**-25


@dataclass(frozen=True)
class QuantisedLogEncoding(Encoding):
    """Log-probs x as integer codes q = round(g(-x)): g is linear with step `step` nats for -x <= `knee`; then
    uniform in sqrt(p) (the step grows as exp((-x - knee) / 2)) until it reaches `max_step`; then linear
    with step `max_step`. knee=inf is a plain uniform grid. Decoding returns the middle of the code's bin
    (in nats), so the rounding error is at most half the bin's width."""

    step: float = 2.0**-8
    knee: float = math.inf
    max_step: float = 2.0**-8
    dtype: np.dtype = np.dtype(np.uint32)
    min_value: float = FP16_MIN
    delta_coded: bool = True
    _tables: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.step <= self.max_step:
            raise ValueError(f"{self.name}: need 0 < step <= max_step")
        max_code = int(np.rint(self._code(np.array([-self.min_value]))[0]))
        if self.uniform:
            object.__setattr__(self, "_tables", (max_code, None, None))
            return
        # Every code's decoded value and bin half-width, as lookup tables (about 66k codes down to -65504).
        edges = self._inverse(np.arange(max_code + 2) - 0.5)
        edges[0] = 0.0
        middles = (edges[:-1] + edges[1:]) / 2
        middles[0] = 0.0  # code 0's bin is [0, step/2]: decode it as exactly 0
        values = (-middles).astype(np.float32)
        # Half-widths plus the float32 rounding of the decoded value, rounded up to float32.
        half = np.maximum(middles - edges[:-1], edges[1:] - middles) + np.abs(values - -middles)
        half32 = half.astype(np.float32)
        half32 = np.where(half32 < half, np.nextafter(half32, np.float32(np.inf)), half32)
        object.__setattr__(self, "_tables", (max_code, values, half32))

    @property
    def uniform(self) -> bool:
        return math.isinf(self.knee)

    @property
    def _cap(self) -> tuple[float, float, float]:
        """(code at the knee, -x where the step reaches max_step, its code)."""
        q_knee = self.knee / self.step
        u_cap = self.knee + 2.0 * math.log(self.max_step / self.step)
        return q_knee, u_cap, q_knee + 2.0 / self.step - 2.0 / self.max_step

    def _code(self, u: np.ndarray) -> np.ndarray:
        """Continuous code g(u) for u = -x >= 0 (float64). Written as the middle piece on u clipped to
        [knee, u_cap], corrected by the linear pieces outside: one pass of expm1, no branches."""
        if self.uniform:
            return u / self.step
        q_knee, u_cap, _ = self._cap
        clipped = np.clip(u, self.knee, u_cap)
        g = np.expm1((self.knee - clipped) / 2.0)
        g *= -2.0 / self.step
        g += q_knee
        g -= np.maximum(self.knee - u, 0.0) / self.step
        g += np.maximum(u - u_cap, 0.0) / self.max_step
        return g

    def _inverse(self, q: np.ndarray) -> np.ndarray:
        """u = g^-1(q) for real q (float64)."""
        if self.uniform:
            return q * self.step
        q_knee, u_cap, q_cap = self._cap
        mid = self.knee - 2.0 * np.log1p(-(np.clip(q, q_knee, q_cap) - q_knee) * self.step / 2.0)
        return np.where(q <= q_knee, q * self.step, np.where(q <= q_cap, mid, u_cap + (q - q_cap) * self.max_step))

    @property
    def max_code(self) -> int:
        """The code of min_value: larger codes are never written."""
        return self._tables[0]

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        u = -np.minimum(np.asarray(logprobs, dtype=np.float64), 0.0)
        return np.rint(self._code(u)).astype(self.dtype)

    def decode(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        codes = np.asarray(codes)
        if self.uniform:  # exact: codes * step is representable in float32 for every code up to max_code
            if out is None:
                out = np.empty(codes.shape, dtype=np.float32)
            np.copyto(out, codes, casting="unsafe")  # int -> float32, then a power of two: one rounding
            return np.multiply(out, np.float32(-self.step), out=out)
        return np.take(self._tables[1], np.minimum(codes, self.max_code), out=out)

    def bin_halfwidth(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if self.uniform:
            return np.full(codes.shape, self.step / 2, dtype=np.float32)
        return self._tables[2][np.minimum(codes, self.max_code)]

    def stated_bound(self, logprobs: np.ndarray) -> np.ndarray:
        u = np.abs(np.asarray(logprobs, dtype=np.float64))
        if self.uniform:
            return np.full(u.shape, self.step / 2)
        # Half the local step, times 1.4 for bins that straddle the knee or grow within themselves.
        growing = 1.4 * self.step / 2 * np.exp(np.clip(u - self.knee, 0.0, 4 * math.log(self.max_step / self.step)) / 2)
        return np.minimum(growing, self.max_step / 2)

    @property
    def worst_rounding(self) -> float:
        """The largest bin half-width over all codes."""
        return self.step / 2 if self.uniform else self.max_step / 2


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        Fp16Encoding(),
        QuantisedLogEncoding(name="qlog8", step=2.0**-8, max_step=2.0**-8),
        QuantisedLogEncoding(name="qlog5", step=2.0**-5, max_step=2.0**-5),
        QuantisedLogEncoding(name="qsqrt5", step=2.0**-5, knee=4.0, max_step=2.0),
    )
}


def get_encoding(name: str) -> Encoding:
    """The registered encoding called `name`; UserError naming the known ones otherwise."""
    try:
        return ENCODINGS[name]
    except KeyError:
        raise UserError(f"unknown log-prob encoding {name!r}; known: {', '.join(sorted(ENCODINGS))}") from None
