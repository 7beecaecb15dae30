"""How much of a model's transformer blocks the tracked modules cover.

Influence is computed over the tracked layers only, so a database that tracks
a small share of the blocks' weights answers a narrower question than users
expect.  Mixture-of-experts models store their experts as fused 3-D parameters
(Mixtral, OLMoE, Qwen2-MoE: ``experts.gate_up_proj`` of shape
(experts, d_out, d_in)) and route with plain weight matrices; neither is an
``nn.Linear``, so the default patterns would silently track attention only.
:func:`refuse_untracked_experts` turns that into an error that names the
parameters and says how to choose modules explicitly.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from attribdb.errors import ConfigError
from attribdb.tracking import DEFAULT_LM_PATTERNS, TrackedModule


def _in_blocks(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in DEFAULT_LM_PATTERNS)


def _layer_wildcard(name: str) -> str:
    """'model.layers.3.mlp.experts.down_proj' -> 'model.layers.*.mlp.experts.down_proj'."""
    return re.sub(r"\.\d+(?=\.)", ".*", name)


@dataclass(frozen=True)
class Coverage:
    """Parameter counts of the transformer blocks and of the tracked modules' weights and biases."""

    tracked: int
    block: int
    fused_experts: tuple[str, ...]  # untracked ≥ 3-D block parameters, layer indices as '*'

    @property
    def share(self) -> float:
        return self.tracked / self.block if self.block else 1.0


def measure_coverage(model: nn.Module, modules: list[TrackedModule]) -> Coverage:
    """Share of the block parameters (those under :data:`DEFAULT_LM_PATTERNS`; every parameter
    for a model without such blocks) that the tracked modules own."""
    tracked_names = {m.name for m in modules}
    params = dict(model.named_parameters())
    in_blocks = {name: p for name, p in params.items() if _in_blocks(name)} or params
    tracked = sum(p.numel() for name, p in in_blocks.items() if name.rpartition(".")[0] in tracked_names)
    fused = dict.fromkeys(_layer_wildcard(name) for name, p in in_blocks.items()
                          if p.dim() >= 3 and name.rpartition(".")[0] not in tracked_names)
    return Coverage(tracked, sum(p.numel() for p in in_blocks.values()), tuple(fused))


def refuse_untracked_experts(coverage: Coverage) -> None:
    """Raise a one-line :class:`ConfigError` when fused expert weights would go untracked by default."""
    if not coverage.fused_experts:
        return
    names = ", ".join(coverage.fused_experts)
    raise ConfigError(
        f"this model keeps fused expert weights ({names}) that attribdb cannot track; the default layers cover "
        f"only {coverage.share:.0%} of the block parameters. To attribute through the tracked layers alone, "
        "name them explicitly, e.g. --modules '*.self_attn.*'")
