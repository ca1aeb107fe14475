"""Which student linears get a LoRA update: config regexes resolved against module names.

A target is an `nn.Linear` inside a numbered decoder layer (`...layers.{i}...`): the hypernetwork
conditions on the layer index and on the module kind (the last name component, e.g. `q_proj`).
The routed experts of Qwen3-Next are 3-D parameters, not linears, so no pattern can reach them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from common.errors import UserError

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    name: str
    """Fully qualified module name, e.g. 'model.layers.3.self_attn.q_proj'."""
    layer: int
    """Decoder layer index."""
    kind: str
    """Last component of the name, e.g. 'q_proj'."""
    in_features: int
    out_features: int

    @property
    def shape_key(self) -> str:
        """Targets with the same (d_in, d_out) share one pair of generator heads."""
        return f"in{self.in_features}_out{self.out_features}"


def resolve_targets(model: nn.Module, patterns: list[str]) -> list[Target]:
    """Every nn.Linear whose name `re.search`es one of `patterns`, sorted by (layer, name).

    Raises UserError for an invalid regex, a pattern that matches no linear, or a matched linear
    outside a numbered layer.
    """
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    compiled = []
    for pattern in patterns:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except re.error as e:
            raise UserError(f"config field 'hyper.targets': {pattern!r} is not a valid regex ({e})") from None

    chosen: dict[str, nn.Linear] = {}
    for pattern, rx in compiled:
        hits = [name for name in linears if rx.search(name)]
        if not hits:
            examples = ", ".join(_examples(linears))
            raise UserError(
                f"config field 'hyper.targets': pattern {pattern!r} matches no nn.Linear in the student "
                f"(linears look like: {examples})"
            )
        chosen.update((name, linears[name]) for name in hits)

    targets = []
    for name, mod in chosen.items():
        m = _LAYER_INDEX.search(name)
        if m is None:
            raise UserError(
                f"config field 'hyper.targets': {name!r} is not inside a numbered decoder layer "
                "(the hypernetwork conditions on the layer index)"
            )
        targets.append(Target(name, int(m.group(1)), name.rsplit(".", 1)[-1], mod.in_features, mod.out_features))
    return sorted(targets, key=lambda t: (t.layer, t.name))


def _examples(linears: dict[str, nn.Linear], limit: int = 8) -> list[str]:
    """A few distinct linear names (one per kind) for error hints."""
    by_kind: dict[str, str] = {}
    for name in linears:
        by_kind.setdefault(name.rsplit(".", 1)[-1], name)
    return list(by_kind.values())[:limit]
