"""The cache's metadata: `RootMeta` (the root attributes: what was scored, by which teacher, rendered how,
stored in which format) and `PartMeta` (a part's attributes), as frozen keyword-only dataclasses that check
every field when parsed, so a malformed or foreign cache is refused with one line naming the attribute."""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from cache_schema.encoding import get_encoding
from cache_schema.format import MAX_VOCAB, POSITION_MODES, SCHEMA_VERSION, PositionsMode
from common.errors import UserError


def _check_type(value: Any, tp: type, key: str, where: str) -> Any:
    if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
        raise UserError(f"{where}: attribute '{key}' must be {tp.__name__}, got {value!r}")
    return value


class _Meta:
    """Base of the metadata dataclasses: `to_dict` and a `from_dict` that checks every field's type from its
    annotation (nested metadata recursively; a field is optional only when its type admits None)."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Any, where: str):
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a mapping, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            args = typing.get_args(hints[f.name])
            optional = type(None) in args
            tp = next(a for a in args if a is not type(None)) if optional else hints[f.name]
            if typing.get_origin(tp) is Literal:
                tp = str  # the allowed values are checked in __post_init__
            value = d.get(f.name)
            if value is None:
                if not optional:
                    raise UserError(f"{where}: missing attribute '{f.name}'")
            elif isinstance(tp, type) and issubclass(tp, _Meta):
                value = tp.from_dict(value, f"{where} {f.name}")
            else:
                _check_type(value, typing.get_origin(tp) or tp, f.name, where)
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class TeacherMeta(_Meta):
    model: str
    revision: str | None = None
    dtype: str
    quantization: str | None = None
    backend: str
    engine_version: str
    """e.g. 'vllm 0.32.0'; may differ between parts written by different runs (see PartMeta)."""

    # Fields that define the teacher's numbers; engine_version is recorded per part instead.
    IDENTITY = ("model", "revision", "dtype", "quantization", "backend")


@dataclass(frozen=True, kw_only=True)
class TokenizerMeta(_Meta):
    name: str
    path: str
    """Where `cache show` loads it from (a local folder AutoTokenizer reads); may be empty."""
    fingerprint: str


@dataclass(frozen=True, kw_only=True)
class DatasetMeta(_Meta):
    source: str
    fingerprint: str
    filter: dict = field(default_factory=dict)


MAX_DRAWS = 65535  # draw counts are stored as uint16


@dataclass(frozen=True, kw_only=True)
class SamplingMeta(_Meta):
    """Sampled rows (RS-KD): how the draws were made."""

    draws: int
    """N draws per row, with replacement, from the teacher's distribution at temperature 1."""
    seed: int
    """Seed of the per-sample uniforms (stage1_teacher.sampling.sample_uniforms)."""
    support_k: int | None = None
    """None: every draw is a token (support 'full': the HF backend and vLLM's engine capture resolve draws outside
    the top-K exactly); an int K: draws outside the engine's top-K are only counted, as the row's tail (support
    'top-K', vLLM's public path)."""

    @property
    def support(self) -> str:
        """'full' or 'top-<K>'."""
        return "full" if self.support_k is None else f"top-{self.support_k}"

    def __post_init__(self) -> None:
        where = "cache root metadata sampled"
        if not 1 <= self.draws <= MAX_DRAWS:
            raise UserError(f"{where}: draws must be in [1, {MAX_DRAWS}], got {self.draws}")
        if self.seed < 0:
            raise UserError(f"{where}: seed must be >= 0, got {self.seed}")
        if self.support_k is not None and self.support_k < 1:
            raise UserError(f"{where}: support_k must be >= 1 or null, got {self.support_k}")


@dataclass(frozen=True, kw_only=True)
class RootMeta(_Meta):
    """The cache's root attributes."""

    schema_version: int = SCHEMA_VERSION
    k: int
    encoding: str
    """Log-prob encoding (cache_schema.encoding.ENCODINGS)."""
    mass_epsilon: float | None = None
    """Mass-adaptive K: rows keep the fewest top entries covering 1 - mass_epsilon (None: all K)."""
    positions: PositionsMode
    teacher: TeacherMeta
    tokenizer: TokenizerMeta
    chat_template_fingerprint: str
    vocab_size: int
    dataset: DatasetMeta
    num_shards: int
    config: dict = field(default_factory=dict)
    """The resolved run config of the run that created the cache."""
    sampled: SamplingMeta | None = None
    """Sampled rows (RS-KD) instead of top-K rows; None for a top-K cache."""

    def __post_init__(self) -> None:
        where = "cache root metadata"
        nested = [("teacher", TeacherMeta), ("tokenizer", TokenizerMeta), ("dataset", DatasetMeta)]
        if self.sampled is not None:
            nested.append(("sampled", SamplingMeta))
        for name, cls in nested:
            value = getattr(self, name)
            if not isinstance(value, cls):  # a plain mapping is accepted and checked like stored metadata
                object.__setattr__(self, name, cls.from_dict(value, f"{where} {name}"))
        if self.schema_version != SCHEMA_VERSION:
            raise UserError(f"{where}: schema_version {self.schema_version}, this code writes {SCHEMA_VERSION}")
        if self.k < 1:
            raise UserError(f"{where}: k must be >= 1, got {self.k}")
        if get_encoding(self.encoding).delta_coded and self.vocab_size > 2**31:
            raise UserError(f"{where}: the {self.encoding} encoding needs vocab_size <= 2**31, got {self.vocab_size}")
        eps = self.mass_epsilon
        if eps is not None:
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
                raise UserError(f"{where}: mass_epsilon must be a number in (0, 1) or null, got {eps!r}")
            object.__setattr__(self, "mass_epsilon", float(eps))
        if self.positions not in POSITION_MODES:
            raise UserError(f"{where}: positions must be one of {list(POSITION_MODES)}, got {self.positions!r}")
        if not 1 <= self.vocab_size <= MAX_VOCAB:
            raise UserError(f"{where}: vocab_size must be in [1, 2**32], got {self.vocab_size}")
        if self.k > self.vocab_size:
            raise UserError(f"{where}: k={self.k} exceeds vocab_size={self.vocab_size}")
        if self.num_shards < 1:
            raise UserError(f"{where}: num_shards must be >= 1, got {self.num_shards}")
        if self.sampled is not None:
            if self.mass_epsilon is not None:
                raise UserError(f"{where}: sampled rows and mass_epsilon do not combine")
            if self.encoding != "fp16":
                raise UserError(f"{where}: sampled rows store draw counts, not log-probs: encoding must be the "
                                f"default 'fp16', got {self.encoding!r}")
            if self.sampled.draws > self.vocab_size:
                raise UserError(f"{where}: sampled draws={self.sampled.draws} exceeds vocab_size={self.vocab_size} "
                                "(rows are padded with distinct ids)")
        try:
            json.dumps(self.config)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: config is not JSON-serialisable ({e})") from None

    def identity(self) -> dict[str, Any]:
        """Fields a run must agree on to add parts to an existing cache (dotted names)."""
        ident = {
            "k": self.k,
            "encoding": self.encoding,
            "mass_epsilon": self.mass_epsilon,
            "positions": self.positions,
            "vocab_size": self.vocab_size,
            "num_shards": self.num_shards,
            "tokenizer.fingerprint": self.tokenizer.fingerprint,
            "chat_template_fingerprint": self.chat_template_fingerprint,
            "dataset.fingerprint": self.dataset.fingerprint,
            "sampled": None if self.sampled is None else self.sampled.to_dict(),
        }
        ident.update({f"teacher.{f}": getattr(self.teacher, f) for f in TeacherMeta.IDENTITY})
        return ident

    @property
    def row_width(self) -> int:
        """Columns of the rows handed to training: k for top-K caches, the draws N for sampled ones."""
        return self.k if self.sampled is None else self.sampled.draws

    def mismatches(self, other: RootMeta) -> list[tuple[str, Any, Any]]:
        """(field, self's value, other's value) for each identity field that differs."""
        mine, theirs = self.identity(), other.identity()
        return [(key, mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]]

    def require_same(self, run: RootMeta, path: str) -> None:
        """`self` is a cache's stored metadata: UserError naming the first identity field in which the run's
        metadata `run` differs, with both values."""
        diffs = self.mismatches(run)
        if diffs:
            name, have, want = diffs[0]
            raise UserError(
                f"cache {path}: {name} is {have!r} in the cache but {want!r} in this run; "
                "use a new cache path or the cache's settings"
            )

    @classmethod
    def from_dict(cls, d: Any, where: str) -> RootMeta:
        """Parse root attributes; `where` (the cache path) is named in errors. A different schema_version
        is refused with both versions named."""
        if not isinstance(d, dict) or "schema_version" not in d:
            return super().from_dict(d, where)  # names what is missing
        version = _check_type(d["schema_version"], int, "schema_version", where)
        if version != SCHEMA_VERSION:
            relation = "newer" if version > SCHEMA_VERSION else "older"
            raise UserError(
                f"{where}: cache schema_version {version} is {relation} than this code's {SCHEMA_VERSION}; "
                "use a matching hyperdistill version or rebuild the cache"
            )
        return super().from_dict(d, where)


@dataclass(frozen=True, kw_only=True)
class PartMeta(_Meta):
    """A part's attributes. Written twice: at start (complete=False) and when done (complete=True last)."""

    complete: bool
    shard: int
    owner: str
    k: int
    encoding: str
    n_samples: int = 0
    n_tokens: int = 0
    n_prompt_tokens: int = 0
    n_rows: int = 0
    config_hash: str
    """config_hash() of the resolved config of the run that wrote this part."""
    engine_version: str
    timings: dict = field(default_factory=dict)
    """Seconds (or rates) by name: the writer's own plus those passed to finish()."""
    extra: dict = field(default_factory=dict)
    """Other attributes passed to finish()."""

    def __post_init__(self) -> None:
        for key in ("n_samples", "n_tokens", "n_prompt_tokens", "n_rows"):
            if getattr(self, key) < 0:
                raise UserError(f"part metadata: attribute '{key}' must be >= 0, got {getattr(self, key)}")
