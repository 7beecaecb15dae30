"""Compression of preconditioned gradients: low-rank factors and random sketches.

*Low rank* (what exact rescoring reads): the top-``r`` singular triplets of
each ``Ĝ_m`` per module, ``U`` and ``V`` with unit-norm columns in float16
and ``σ`` in float32, plus the fraction of ``‖Ĝ_m‖²`` kept.  Then
``⟨Ĝ_q, Ĝ_m⟩ ≈ Σ_k σ_k u_kᵀ Ĝ_q v_k`` with error at most
``‖Ĝ_q‖ ‖Ĝ_m‖ sqrt(1 − energy)``.

*Sketch* (what FAISS indexes): a seeded Kronecker Gaussian projection per
module, ``vec(P_out Ĝ P_inᵀ)`` with entries of variance ``1/k``, so the sketch
inner product is an unbiased estimate of the score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribdb.tracking import TrackedModule


@dataclass
class LowRank:
    """Rank-r factors of a batch of matrices (B, d_out, d_in)."""

    u: torch.Tensor  # (B, r, d_out), unit-norm rows
    v: torch.Tensor  # (B, r, d_in), unit-norm rows
    sigma: torch.Tensor  # (B, r), descending
    energy: torch.Tensor  # (B,), fraction of the squared Frobenius norm kept


def low_rank(matrices: torch.Tensor, rank: int) -> LowRank:
    """Exact top-``rank`` SVD through the eigendecomposition of the smaller Gram matrix.

    A full batched SVD costs several times more than one forward and backward
    pass; the Gram matrix of the short side (at most a few hundred wide) is
    cheap, and float64 eigh keeps the leading triplets accurate.
    """
    transposed = matrices.shape[-2] < matrices.shape[-1]
    tall = matrices.transpose(-1, -2) if transposed else matrices  # (B, long, short)
    gram = (tall.transpose(-1, -2) @ tall).double()
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    kept = min(rank, gram.shape[-1])
    top_vals = eigvals[..., -kept:].flip(-1).clamp_min(0)
    right = eigvecs[..., -kept:].flip(-1)  # (B, short, r)
    if kept < rank:  # a module narrower than the rank: pad with zero triplets
        top_vals = torch.nn.functional.pad(top_vals, (0, rank - kept))
        right = torch.nn.functional.pad(right, (0, rank - kept))
    sigma = top_vals.sqrt()
    left = tall.double() @ right  # (B, long, r) = U σ
    left = left / left.norm(dim=-2, keepdim=True).clamp_min(1e-300)
    total = eigvals.clamp_min(0).sum(-1)
    energy = torch.where(total > 0, top_vals.sum(-1) / total.clamp_min(1e-300), torch.ones_like(total))
    if transposed:
        left, right = right, left
    return LowRank(u=left.transpose(-1, -2).to(torch.float16), v=right.transpose(-1, -2).to(torch.float16),
                   sigma=sigma.float(), energy=energy.float())


def low_rank_scores(query: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """⟨Ĝ_q, U diag(σ) Vᵀ⟩ for queries (Q, d_out, d_in) and stored rows: (Q, N).

    One GEMM, ``Ĝ_q Vᵀ`` against every stored (row, k) at once, then a cheap
    contraction with U: Σ_k σ_k u_kᵀ (Ĝ_q v_k).
    """
    n, r, d_out = u.shape
    u_flat = u.to(query.dtype).reshape(n * r, d_out)  # (N·r, d_out)
    v_flat = v.to(query.dtype).reshape(n * r, -1)  # (N·r, d_in)
    projected = query @ v_flat.T  # (Q, d_out, N·r)
    per_component = (projected * u_flat.T).sum(1).reshape(-1, n, r)  # (Q, N, r)
    return (per_component * sigma.to(query.dtype)).sum(-1)


class Sketcher:
    """Seeded Kronecker random projections, one pair per module."""

    def __init__(self, modules: list[TrackedModule], side: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.side = side
        self.projections = {}
        for m in modules:
            p_out = torch.randn(side, m.d_out, generator=generator, dtype=torch.float64) / side ** 0.5
            p_in = torch.randn(side, m.d_in, generator=generator, dtype=torch.float64) / side ** 0.5
            self.projections[m.name] = (p_out, p_in)
        self._cache: dict = {}

    @property
    def dim(self) -> int:
        return len(self.projections) * self.side ** 2

    def _on(self, name: str, device, dtype):
        key = (name, str(device), dtype)
        if key not in self._cache:
            p_out, p_in = self.projections[name]
            self._cache[key] = (p_out.to(device, dtype), p_in.to(device, dtype))
        return self._cache[key]

    def sketch(self, preconditioned: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, dim) float32: concatenated vec(P_out Ĝ P_inᵀ) over modules, in model order."""
        parts = []
        for name in self.projections:
            pre = preconditioned[name]
            p_out, p_in = self._on(name, pre.device, pre.dtype)
            parts.append((p_out @ pre @ p_in.T).flatten(1))
        return torch.cat(parts, dim=1).float()
