"""Influence scores: preconditioned gradients and their inner products.

``score(q, m) = Σ_modules ⟨Ĝ_q, Ĝ_m⟩_F = g_qᵀ (F + λ)⁻¹ g_m`` with
``Ĝ = (Q_Sᵀ G Q_A) ⊘ sqrt(D + λ)``.  A positive score means a gradient step on
``m`` lowers the query's loss: training on ``m`` made the completion likelier.

:meth:`InfluenceComputer.exhaustive_scores` is what kronfluence does for every
query batch: score queries against every training sequence on the fly.  In
attribdb it is the ground truth the index is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attribdb.factors import Factors
from attribdb.gradients import GradientRunner
from attribdb.tasks import Task
from attribdb.tracking import Capture

Preconditioned = dict[str, torch.Tensor]  # module name -> Ĝ (B, d_out, d_in)


def pairwise_scores(left: Preconditioned, right: Preconditioned) -> torch.Tensor:
    """(B_left, B_right) sums over modules of Frobenius inner products."""
    return sum(torch.einsum("qoi,moi->qm", left[name], right[name]) for name in left)


def per_module_scores(left: Preconditioned, right: Preconditioned) -> dict[str, torch.Tensor]:
    return {name: torch.einsum("qoi,moi->qm", left[name], right[name]) for name in left}


def self_influence(pre: Preconditioned) -> torch.Tensor:
    """‖Ĝ_m‖² summed over modules, per sequence (B,)."""
    return sum((g.flatten(1) ** 2).sum(1) for g in pre.values())


def token_contributions(inverse_hvp: dict[str, torch.Tensor], captures: dict[str, Capture]) -> torch.Tensor:
    """Split scores over the training sequence's tokens: ``c_t = Σ_modules δ_tᵀ R a_t``.

    ``R = (F + λ)⁻¹ g_q`` (d_out, d_in) of one query; since ``G_m = Σ_t δ_t a_tᵀ``,
    ``Σ_t c_t = ⟨R, G_m⟩`` is the sequence's score.  Returns (B, T).
    """
    return sum(torch.einsum("bto,oi,bti->bt", captures[name].grads_out, r.to(captures[name].acts.dtype),
                            captures[name].acts) for name, r in inverse_hvp.items())


@dataclass
class ScoreMatrix:
    scores: torch.Tensor  # (n_queries, n_train)
    train_self_influence: torch.Tensor  # (n_train,)


class InfluenceComputer:
    """Preconditioned gradients of batches under fitted factors.

    It holds the only copy of the factors a process needs, on its device and in
    its compute dtype; factors given in another dtype or on another device are
    converted once here (load them with ``Factors.load(path, device, dtype)``
    to never hold a second copy).
    """

    def __init__(self, model: nn.Module, task: Task, factors: Factors, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.runner = GradientRunner(model, task, factors.modules, device=device, dtype=dtype)
        self.factors = factors.to(device=device, dtype=dtype)

    def precondition(self, captures: dict[str, Capture]) -> Preconditioned:
        """Ĝ of every sequence of a batch from its captures (dense: d_out × d_in per module)."""
        return {name: self.factors[name].half_precondition(self.factors[name].rotated_gradients(capture))
                for name, capture in captures.items()}

    def train_preconditioned(self, batch: Any) -> Preconditioned:
        """Ĝ_m of each training sequence of the batch (its own labels)."""
        return self.precondition(self.runner.train_captures(batch)[0])

    def query_preconditioned(self, batch: Any) -> Preconditioned:
        """Ĝ_q of each query of the batch (gradient of the measurement)."""
        return self.precondition(self.runner.measurement_captures(batch)[0])

    def rotated_inverse_hvp(self, captures: dict[str, Capture]) -> dict[str, torch.Tensor]:
        """(F + λ)⁻¹ g per module in the eigenbasis (B, d_out, d_in), from captures."""
        return {name: self.factors[name].rotated_inverse_hvp(capture) for name, capture in captures.items()}

    def inverse_hvp(self, preconditioned: Preconditioned) -> dict[str, torch.Tensor]:
        """(F + λ)⁻¹ g per module, in parameter layout (B, d_out, d_in), from Ĝ: the other half of
        the preconditioning, rotated back."""
        return {name: self.factors[name].unrotate(self.factors[name].half_precondition(g))
                for name, g in preconditioned.items()}

    def exhaustive_scores(self, query_batches: Iterable, train_batches: Iterable,
                          progress: Callable[[int], None] | None = None) -> ScoreMatrix:
        """Score every query against every training sequence in one pass over the training set."""
        queries = [self.query_preconditioned(b) for b in query_batches]
        query_pre = {name: torch.cat([q[name] for q in queries]) for name in queries[0]}
        columns, self_scores = [], []
        for batch in train_batches:
            train_pre = self.train_preconditioned(batch)
            columns.append(pairwise_scores(query_pre, train_pre))
            self_scores.append(self_influence(train_pre))
            if progress:
                progress(self_scores[-1].shape[0])
        return ScoreMatrix(torch.cat(columns, dim=1), torch.cat(self_scores))
