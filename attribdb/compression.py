"""Compression of preconditioned gradients: low-rank factors and random sketches.

*Low rank* (what exact rescoring reads): the top-``r`` singular triplets of
each ``Ĝ_m`` per module, ``U`` and ``V`` with unit-norm columns in float16
and ``σ`` in float32, plus the fraction of ``‖Ĝ_m‖²`` kept.  Then
``⟨Ĝ_q, Ĝ_m⟩ ≈ Σ_k σ_k u_kᵀ Ĝ_q v_k`` with error at most
``‖Ĝ_q‖ ‖Ĝ_m‖ sqrt(1 − energy)``.

*Sketch* (what FAISS indexes): a seeded random linear map per module whose
inner products estimate scores without bias: a CountSketch by default, or the
Kronecker projection ``vec(P_out Ĝ P_inᵀ)``.  On per-sequence gradients,
which are nearly low rank, the CountSketch found the true top 10 among 64
candidates far more often at the same size (tools/bench_query.py).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from attribdb.errors import ConfigError, StoreError
from attribdb.tracking import TrackedModule


@dataclass
class LowRank:
    """Rank-r factors of a batch of matrices (B, d_out, d_in)."""

    u: torch.Tensor  # (B, r, d_out), unit-norm rows
    v: torch.Tensor  # (B, r, d_in), unit-norm rows
    sigma: torch.Tensor  # (B, r), descending
    energy: torch.Tensor  # (B,), fraction of the squared Frobenius norm kept
    total: torch.Tensor  # (B,) float64, the squared Frobenius norm

    def split(self, rank: int) -> tuple["LowRank", "LowRank"]:
        """The first ``rank`` triplets and the rest, each with the energy it keeps on its own."""
        def part(sl: slice) -> LowRank:
            sigma = self.sigma[:, sl]
            return LowRank(self.u[:, sl], self.v[:, sl], sigma, _energy_kept(sigma, self.total), self.total)

        return part(slice(None, rank)), part(slice(rank, None))


def _energy_kept(sigma: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Σσ² / ‖X‖² per matrix, float32; 1 for an all-zero matrix (nothing was lost)."""
    kept = (sigma.double() ** 2).sum(-1)
    return torch.where(total > 0, kept / total.clamp_min(1e-300), torch.ones_like(total)).clamp(max=1.0).float()


OVERSAMPLE = 8  # extra directions in the randomized range finder
POWER_ITERATIONS = 1


@functools.lru_cache(maxsize=64)
def _test_matrix(n: int, width: int, device, dtype) -> torch.Tensor:
    """A fixed Gaussian test matrix per shape: the same rows always get the same factors (resumes are exact)."""
    generator = torch.Generator().manual_seed(n * 1_000_003 + width)
    return torch.randn(n, width, generator=generator, dtype=torch.float64).to(device, dtype)


def low_rank(matrices: torch.Tensor, rank: int) -> LowRank:
    """Truncated SVD of a batch (B, d_out, d_in) by randomized subspace iteration.

    A full SVD (or an eigendecomposition of the Gram matrix) costs more than
    the forward and backward pass that produced the gradient; a range finder
    with one power iteration keeps nearly the optimal energy (0.686 of ‖Ĝ‖²
    against 0.695 with four iterations, on a 4-layer GPT-2 at rank 8) at a
    fraction of that.  The kept part is an orthogonal projection of the
    matrix, so ``energy`` is exact and the error of a stored score is at most
    ``‖Ĝ_q‖ ‖Ĝ_m‖ sqrt(1 − energy)``.
    """
    batch, d_out, d_in = matrices.shape
    width = min(rank + OVERSAMPLE, d_out, d_in)
    basis = matrices @ _test_matrix(d_in, width, matrices.device, matrices.dtype)  # (B, d_out, width)
    for _ in range(POWER_ITERATIONS):
        basis, _ = torch.linalg.qr(basis)
        basis = matrices @ (matrices.transpose(-1, -2) @ basis)
    basis, _ = torch.linalg.qr(basis)
    projected = basis.transpose(-1, -2) @ matrices  # (B, width, d_in): the matrix in the found range
    # its SVD through the tiny width × width Gram matrix, largest first
    eigvals, small_u = torch.linalg.eigh((projected @ projected.transpose(-1, -2)).double())
    kept = min(rank, width)
    small_u = small_u[..., -kept:].flip(-1).to(matrices.dtype)
    sigma = eigvals[..., -kept:].flip(-1).clamp_min(0).sqrt()
    u = (basis @ small_u).transpose(-1, -2)  # (B, kept, d_out)
    v = small_u.transpose(-1, -2) @ projected  # (B, kept, d_in) = σ vᵀ
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    if kept < rank:  # a module narrower than the rank: pad with zero triplets
        u = torch.nn.functional.pad(u, (0, 0, 0, rank - kept))
        v = torch.nn.functional.pad(v, (0, 0, 0, rank - kept))
        sigma = torch.nn.functional.pad(sigma, (0, rank - kept))
    total = matrices.pow(2).sum((-1, -2)).double()
    return LowRank(u=u.to(torch.float16), v=v.to(torch.float16), sigma=sigma.float(), energy=_energy_kept(sigma, total),
                   total=total)


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


class KroneckerSketch:
    """vec(P_out X P_inᵀ) with Gaussian P of variance 1/side: side² numbers from two small matrices.

    Cheap to store, but for nearly low-rank X (as per-sequence gradients are)
    its estimate is a product of two side-dimensional estimates, far noisier
    than its side² numbers suggest.
    """

    kind = "kronecker"

    def __init__(self, p_out: torch.Tensor, p_in: torch.Tensor):
        self.p_out, self.p_in = p_out, p_in

    @classmethod
    def create(cls, module: TrackedModule, size: int, generator: torch.Generator) -> "KroneckerSketch":
        side = math.isqrt(size)
        if side * side != size:
            raise ConfigError(f"a kronecker sketch needs a square sketch-size, not {size}")
        return cls(torch.randn(side, module.d_out, generator=generator) / side ** 0.5,
                   torch.randn(side, module.d_in, generator=generator) / side ** 0.5)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"out": self.p_out, "in": self.p_in}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        p_out, p_in = self.p_out.to(x.device, x.dtype), self.p_in.to(x.device, x.dtype)
        return (p_out @ x @ p_in.T).flatten(1)


class CountSketch:
    """Each entry of X added, with a random sign, to one of ``size`` random buckets.

    Unbiased like a Gaussian projection, with variance near that of a dense
    one whatever the rank of X, at the cost of one bucket and sign per
    parameter (5 bytes each).
    """

    kind = "countsketch"

    def __init__(self, buckets: torch.Tensor, signs: torch.Tensor, size: int):
        self.buckets, self.signs, self.size = buckets, signs, size

    @classmethod
    def create(cls, module: TrackedModule, size: int, generator: torch.Generator) -> "CountSketch":
        n = module.d_out * module.d_in
        buckets = torch.randint(0, size, (n,), generator=generator, dtype=torch.int64).to(torch.int32)
        signs = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(torch.int8)
        return cls(buckets, signs, size)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"buckets": self.buckets, "signs": self.signs}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        signed = x.flatten(1) * self.signs.to(x.device, x.dtype)
        out = torch.zeros(x.shape[0], self.size, dtype=x.dtype, device=x.device)
        return out.index_add_(1, self.buckets.to(x.device, torch.int64), signed)


SKETCH_KINDS = {cls.kind: cls for cls in (CountSketch, KroneckerSketch)}


class Sketcher:
    """Seeded sketches, one per module, concatenated in model order."""

    def __init__(self, kind: str, size: int, per_module: dict):
        self.kind, self.size, self.per_module = kind, size, per_module

    @classmethod
    def create(cls, modules: list[TrackedModule], kind: str, size: int, seed: int) -> "Sketcher":
        generator = torch.Generator().manual_seed(seed)
        return cls(kind, size, {m.name: SKETCH_KINDS[kind].create(m, size, generator) for m in modules})

    @property
    def dim(self) -> int:
        return len(self.per_module) * self.size

    def sketch(self, preconditioned: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, dim) float32; sketch inner products estimate scores without bias."""
        return torch.cat([s.apply(preconditioned[name]) for name, s in self.per_module.items()], dim=1).float()

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"{name}/{key}": t.contiguous() for name, s in self.per_module.items()
                   for key, t in s.tensors().items()}
        tmp = path.with_name(path.name + ".tmp")
        # one metadata key: safetensors writes several in hash order, and the file must be reproducible
        save_file(tensors, str(tmp), metadata={"attribdb": json.dumps({"kind": self.kind, "size": self.size})})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, modules: list[TrackedModule]) -> "Sketcher":
        """The stored sketches (regenerating them would tie a database to torch's RNG forever)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["attribdb"])
                kind, size = header["kind"], int(header["size"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            if kind == "countsketch":
                per_module = {m.name: CountSketch(tensors[f"{m.name}/buckets"], tensors[f"{m.name}/signs"], size)
                              for m in modules}
            else:
                per_module = {m.name: KroneckerSketch(tensors[f"{m.name}/out"], tensors[f"{m.name}/in"])
                              for m in modules}
        except Exception as exc:  # safetensors, JSON and missing keys all mean the same: unreadable
            raise StoreError(f"cannot read the sketch projections {path}: {exc!r}") from exc
        return cls(kind, size, per_module)
