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


def inverse_hvp_self_influence(factors: Factors, inverse_hvps: dict[str, torch.Tensor]) -> torch.Tensor:
    """‖Ĝ_q‖² (Q,) from rotated inverse-HVPs ``G̃ ⊘ (D + λ)``: ``Σ ((D + λ) ⊙ solved²)``, so a query
    whose inverse-HVP is at hand needs no second preconditioning for its self-influence."""
    return sum((factors[name].denominator(1.0) * solved.pow(2)).flatten(1).sum(1)
               for name, solved in inverse_hvps.items())


@dataclass
class RowScores:
    """Full-space scores of a batch of training sequences against some queries."""

    per_module: torch.Tensor  # (Q, B, modules), modules in the order asked for
    self_influence: torch.Tensor  # (B,)


def eigenbasis_scores(factors: Factors, inverse_hvps: dict[str, torch.Tensor], captures: dict[str, Capture],
                      modules: list[str]) -> RowScores:
    """``⟨Ĝ_q, Ĝ_m⟩ = ⟨Q_Sᵀ (F + λ)⁻¹ g_q Q_A, Q_Sᵀ G_m Q_A⟩`` from the queries' rotated inverse-HVPs
    (Q, d_out, d_in) and a training batch's captures, one module at a time.

    Nothing rotates back to parameter coordinates (d_out·d_in·(d_out + d_in) per module and query),
    and only one module's rotated gradients of the batch exist at a time: at GPT-2-small width the
    dense Ĝ of every module of a batch of 8 is ~2.7 GB."""
    per_module, self_scores = [], 0.0
    for name in modules:
        rotated = factors[name].rotated_gradients(captures[name])  # (B, d_out, d_in)
        query = inverse_hvps[name].to(rotated.dtype)
        per_module.append(query.flatten(1) @ rotated.flatten(1).T)
        self_scores = self_scores + factors[name].half_precondition(rotated).flatten(1).pow(2).sum(1)
    return RowScores(torch.stack(per_module, dim=-1), self_scores)


def token_contributions(factors: Factors, inverse_hvp: dict[str, torch.Tensor],
                        captures: dict[str, Capture]) -> torch.Tensor:
    """Split one query's scores over each training sequence's tokens: ``c_t = Σ_modules δ_tᵀ R a_t``
    with ``R = (F + λ)⁻¹ g_q``; since ``G_m = Σ_t δ_t a_tᵀ``, ``Σ_t c_t = ⟨R, G_m⟩`` is the score.
    ``R`` is given in the eigenbasis (d_out, d_in) per module, so the tokens' δ and a are rotated
    rather than ``R`` rotated back.  Returns (B, T)."""
    total = 0.0
    for name, solved in inverse_hvp.items():
        grads_out, acts = factors[name].rotated_tokens(captures[name])
        total = total + ((grads_out @ solved.to(grads_out.dtype)) * acts).sum(-1)
    return total


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
