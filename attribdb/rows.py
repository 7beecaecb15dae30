"""What a stored row is: one float16 vector per training sequence, and how rows score.

A training sequence's influence on a query is ``Σ_modules ⟨Ĝ_q, Ĝ_m⟩`` with
``Ĝ = (Q_Sᵀ G Q_A) ⊘ sqrt(Λ + λ)`` (DESIGN.md).  In the eigenbasis,
coordinate ``(i, j)`` carries an expected ``Λ_ij / (Λ_ij + λ)`` of a
sequence's self-influence (the eigenvalue correction makes
``E[(Q_Sᵀ G Q_A)_ij²] = Λ_ij``).  A row keeps, per module, the block of ``Ĝ``
on the ``k_out`` eigenvectors of S and the ``k_in`` of A that carry the most
of that share, chosen once from the fitted factors under one byte budget for
the whole row (:func:`plan_rows`).

The block is formed without ever forming ``G``: each token's ``δ`` and ``a``
are projected onto the kept eigenvectors (``T·(d_out·k_out + d_in·k_in)``
work) and the block is ``Σ_t (P_outᵀ δ_t)(P_inᵀ a_t)ᵀ ⊘ sqrt(Λ_block + λ)``
(:meth:`RowProjection.encode`).  The blocks, concatenated, are one vector
whose inner products *are* the compressed scores, so FAISS indexes the
vectors themselves and rescoring reads the same vectors back.

On disk a row is that vector divided by its norm, in float16 (entries lie in
[-1, 1], so nothing overflows), and its squared norm, the row's
self-influence, in float32.  Everything that knows this layout lives here;
a change of representation should touch this module alone.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from attribdb.errors import ConfigError, StoreError
from attribdb.factors import Factors, ModuleFactors
from attribdb.tracking import Capture, TrackedModule

ROW_DTYPE = np.float16
SELF_INFLUENCE_DTYPE = np.float32  # a row's squared norm
ROW_KINDS = ("kron", "block")  # the first is the default
MAX_SIDE = 512  # eigenvectors considered per side: keeps planning memory bounded on 7B-wide layers
# Terms of the low-rank (Λ + λ)⁻¹ a kron query row is made with (:func:`_kron_map`).  Measured on the
# demo model's factors: the relative Frobenius error of the approximation is 0.12-0.21 at rank 1,
# 0.016-0.025 at 4, 0.012-0.024 at 8 and 0.008-0.019 at 32 (what remains is the sampling noise of
# the measured eigenvalues), far below the projection's own noise, whose compressed scores
# correlate with the exact ones at Pearson ~0.3.
QUERY_RANK = 8
PROJECTION_FORMAT_VERSION = 2
INDEX_DIM_MULTIPLE = 16  # see index_dim


@dataclass(frozen=True)
class RowLayout:
    """Where each module's block lives in a row, and how large it is."""

    modules: tuple[TrackedModule, ...]
    blocks: tuple[tuple[int, int], ...]  # (k_out, k_in) per module, in module order
    expected_kept: tuple[float, ...] = ()  # per module: expected share of self-influence the block keeps
    normalized_index: bool = True  # FAISS holds unit rows (ranks by cosine) rather than scaled ones
    kind: str = "block"  # "block": the kept eigen-coordinates; "kron": a random Kronecker projection

    def __post_init__(self):
        if self.kind not in ROW_KINDS:
            raise ConfigError(f"unknown row kind {self.kind!r}; choose one of {', '.join(ROW_KINDS)}")
        if len(self.blocks) != len(self.modules):
            raise ConfigError(f"a row layout needs one block per module ({len(self.modules)}), got {len(self.blocks)}")

    @cached_property
    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for module, (k_out, k_in) in zip(self.modules, self.blocks):
            out[module.name] = slice(start, start + k_out * k_in)
            start += k_out * k_in
        return out

    @property
    def dim(self) -> int:
        return sum(k_out * k_in for k_out, k_in in self.blocks)

    @property
    def bytes_per_row(self) -> int:
        """What one row costs in the row store: the float16 vector and its float32 squared norm."""
        return self.dim * np.dtype(ROW_DTYPE).itemsize + np.dtype(SELF_INFLUENCE_DTYPE).itemsize

    @property
    def index_in_row_dtype(self) -> bool:
        """Whether FAISS can keep its vectors in the row dtype bit for bit: unit rows are the stored
        values themselves, in [-1, 1]; rows scaled to their own length could overflow float16."""
        return self.normalized_index

    @property
    def dense_bytes_per_row(self) -> int:
        """The uncompressed float32 Ĝ of every module, for comparison."""
        return 4 * sum(m.d_out * m.d_in for m in self.modules)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "blocks": {m.name: list(b) for m, b in zip(self.modules, self.blocks)},
                "expected_kept": list(self.expected_kept), "normalized_index": self.normalized_index}

    @classmethod
    def from_dict(cls, modules: list[TrackedModule], data: dict) -> "RowLayout":
        try:
            blocks = tuple(tuple(int(k) for k in data["blocks"][m.name]) for m in modules)
            return cls(tuple(modules), blocks, tuple(float(x) for x in data.get("expected_kept", ())),
                       bool(data.get("normalized_index", True)), str(data["kind"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"the manifest's row layout is damaged: {exc!r}") from exc


# ---- planning: which eigen-coordinates a row keeps ---------------------------


def _coordinate_weights(factors: ModuleFactors, d_out: int, d_in: int) -> torch.Tensor:
    """Λ/(Λ+λ): the expected share of self-influence each eigen-coordinate carries (float64)."""
    if factors.diagonal is None:  # identity strategy: no curvature, every coordinate alike
        return torch.ones(d_out, d_in, dtype=torch.float64)
    diagonal = factors.diagonal.double().clamp_min(0)
    denominator = diagonal + factors.damping
    return torch.where(denominator > 0, diagonal / denominator.clamp_min(1e-300), torch.zeros_like(diagonal))


@dataclass
class _ModulePlan:
    out_order: torch.Tensor  # eigenvectors of S by their share, largest first (at most MAX_SIDE)
    in_order: torch.Tensor
    block_mass: torch.Tensor  # [a, b] = share held by the first a+1 × b+1 coordinates
    total: float
    k_out: int = 1
    k_in: int = 1

    def gain(self, side: str) -> float | None:
        """Share added by one more eigenvector on ``side``; None when that side is exhausted."""
        rows, cols = self.block_mass.shape
        if side == "out":
            if self.k_out >= rows:
                return None
            return float(self.block_mass[self.k_out, self.k_in - 1] - self.block_mass[self.k_out - 1, self.k_in - 1])
        if self.k_in >= cols:
            return None
        return float(self.block_mass[self.k_out - 1, self.k_in] - self.block_mass[self.k_out - 1, self.k_in - 1])

    @property
    def kept(self) -> float:
        return float(self.block_mass[self.k_out - 1, self.k_in - 1]) / self.total if self.total > 0 else 1.0


def _module_plan(weights: torch.Tensor) -> _ModulePlan:
    out_order = torch.argsort(weights.sum(1), descending=True, stable=True)[:MAX_SIDE]
    in_order = torch.argsort(weights.sum(0), descending=True, stable=True)[:MAX_SIDE]
    # on the host: the greedy plan reads it a number at a time
    block_mass = weights[out_order][:, in_order].cumsum(0).cumsum(1).float().cpu()
    return _ModulePlan(out_order.cpu(), in_order.cpu(), block_mass, float(weights.sum()))


@dataclass(frozen=True)
class RowPlan:
    """The layout and, per module, the eigenvector indices each side keeps."""

    layout: RowLayout
    out_index: dict[str, torch.Tensor]
    in_index: dict[str, torch.Tensor]


def _factor_weights(factors: Factors) -> Callable[[TrackedModule], torch.Tensor]:
    return lambda m: _coordinate_weights(factors[m.name], m.d_out, m.d_in)


def plan_rows(factors: Factors, row_bytes: int, normalized_index: bool = True) -> RowPlan:
    """Spend ``row_bytes`` where the fitted factors expect the self-influence to be."""
    return plan_from_weights(factors.modules, _factor_weights(factors), row_bytes, normalized_index)


def plan_from_weights(modules: list[TrackedModule], weights: Callable[[TrackedModule], torch.Tensor],
                      row_bytes: int, normalized_index: bool = True) -> RowPlan:
    """Spend ``row_bytes`` on the eigen-coordinates with the largest ``weights(module)`` (d_out, d_in).

    Every module starts with a 1×1 block; then, greedily, the one more
    eigenvector (of S or of A, in any module) that adds the most expected
    share per number added is kept, until the budget is spent.  Widening one
    side adds a whole row or column of the block, so the cost of a step is
    the other side's size; costs only grow, so a step that does not fit now
    never will.
    """
    modules = list(modules)
    budget = _budget(row_bytes, len(modules))
    plans = [_module_plan(weights(m)) for m in modules]  # one module's weights in memory at a time
    remaining = budget - len(plans)
    steps: list[tuple[float, int, str, tuple[int, int]]] = []  # (-gain per number, module, side, its block then)

    def offer(i: int) -> None:
        plan = plans[i]
        for side, cost in (("out", plan.k_in), ("in", plan.k_out)):
            gain = plan.gain(side)
            if gain is not None:  # a step that adds nothing expected still uses bytes the user granted
                heapq.heappush(steps, (-gain / cost, i, side, (plan.k_out, plan.k_in)))

    for i in range(len(plans)):
        offer(i)
    while steps:
        _, i, side, block = heapq.heappop(steps)
        plan = plans[i]
        cost = plan.k_in if side == "out" else plan.k_out
        if block != (plan.k_out, plan.k_in) or cost > remaining:
            continue  # stale (the module grew since) or too large for what is left
        if side == "out":
            plan.k_out += 1
        else:
            plan.k_in += 1
        remaining -= cost
        offer(i)
    layout = RowLayout(tuple(modules), tuple((p.k_out, p.k_in) for p in plans), tuple(p.kept for p in plans),
                       normalized_index)
    return RowPlan(layout, {m.name: p.out_order[:p.k_out].clone() for m, p in zip(modules, plans)},
                   {m.name: p.in_order[:p.k_in].clone() for m, p in zip(modules, plans)})


# ---- encoding: captures → rows ---------------------------------------------------


@dataclass
class BlockMap:
    """One module's maps from captures to its part of a row: ``Σ_t (outᵀ δ_t)(inpᵀ a_t)ᵀ ∘ inverse_scale``.

    A kron row's query side is not the training side's: it is a sum of
    ``rank`` such products (``query_out``, ``query_inp``, one ``k_out`` and one
    ``k_in`` wide slice per term) that applies the inverse curvature on the
    way, so that the score estimate is unbiased for the EK-FAC score (see
    :func:`_kron_map`).
    """

    out: torch.Tensor  # (d_out, k_out)
    inp: torch.Tensor  # (d_in, k_in)
    inverse_scale: torch.Tensor  # (k_out, k_in): 1/√(Λ_block + λ) for a block, ones for kron
    query_out: torch.Tensor | None = None  # (d_out, rank·k_out), kron only
    query_inp: torch.Tensor | None = None  # (d_in, rank·k_in), kron only

    TENSORS = ("out", "inp", "inverse_scale", "query_out", "query_inp")

    def to(self, device=None, dtype=None) -> "BlockMap":
        return BlockMap(*(None if t is None else t.to(device=device, dtype=dtype)
                          for t in (getattr(self, key) for key in self.TENSORS)))

    def block(self, capture: Capture) -> torch.Tensor:
        """(B, k_out, k_in): the training row's part, from (B, T, d) captures."""
        grads_out = capture.grads_out @ self.out.to(capture.grads_out.dtype)  # (B, T, k_out)
        acts = capture.acts @ self.inp.to(capture.acts.dtype)  # (B, T, k_in)
        return torch.einsum("bto,bti->boi", grads_out, acts) * self.inverse_scale.to(acts.dtype)

    def query_block(self, capture: Capture) -> torch.Tensor:
        """(B, k_out, k_in) of a kron row's query side, from (B, T, d) captures:
        ``Σ_r Σ_t (query_out_rᵀ δ_t)(query_inp_rᵀ a_t)ᵀ``, ``T·rank·(d_out·k_out + d_in·k_in)`` work."""
        batch, tokens, _ = capture.grads_out.shape
        k_out, k_in = self.out.shape[1], self.inp.shape[1]
        left = (capture.grads_out @ self.query_out.to(capture.grads_out.dtype)).view(batch, tokens, -1, k_out)
        right = (capture.acts @ self.query_inp.to(capture.acts.dtype)).view(batch, tokens, -1, k_in)
        return torch.einsum("btro,btri->boi", left, right)


def _block_map(factors: ModuleFactors, module: TrackedModule, out_index: torch.Tensor,
               in_index: torch.Tensor) -> BlockMap:
    """Built once, at fit time, on the host (it is saved from there)."""
    factors = factors.to(device="cpu", dtype=torch.float64)
    if factors.diagonal is None:  # identity strategy: nothing to divide by
        denominator = torch.ones(len(out_index), len(in_index), dtype=torch.float64)
    else:
        denominator = factors.diagonal[out_index][:, in_index].clamp_min(0) + factors.damping
    if not torch.all(denominator > 0):
        raise ConfigError(f"module {module.name}: Λ + λ is 0 on kept coordinates; use a positive damping")
    out_basis, in_basis = _bases(factors, module)
    return BlockMap(out_basis[:, out_index], in_basis[:, in_index], denominator.rsqrt())


def _bases(factors: ModuleFactors, module: TrackedModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_S, Q_A), or identities for the strategies that precondition in parameter coordinates."""
    if factors.eigvecs_out is None:
        return torch.eye(module.d_out, dtype=torch.float64), torch.eye(module.d_in, dtype=torch.float64)
    return factors.eigvecs_out, factors.eigvecs_in


def _separable_root(weights: torch.Tensor, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """p, q > 0 with p_i q_j ≈ weights_ij (least squares, by alternating updates from ones)."""
    q = torch.ones(weights.shape[1], dtype=weights.dtype)
    for _ in range(iterations):
        p = weights @ q / (q @ q)
        q = weights.T @ p / (p @ p)
    return p, q


def _low_rank(matrix: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(left (m, r), right (n, r)) with ``left @ right.T`` the best rank-r approximation of ``matrix``:
    an exact SVD when r is near the smaller side, else a seeded randomized range finder with
    power iterations (a 7B-wide 11008×4096 matrix needs seconds, not the minutes of a full SVD)."""
    rank = min(rank, *matrix.shape)
    if rank + 8 >= min(matrix.shape):
        left, values, right = torch.linalg.svd(matrix, full_matrices=False)
    else:
        sketch = torch.randn(matrix.shape[1], rank + 8, generator=generator, dtype=matrix.dtype)
        basis = torch.linalg.qr(matrix @ sketch).Q
        for _ in range(4):
            basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
        left, values, right = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
        left = basis @ left
    root = values[:rank].sqrt()
    return left[:, :rank] * root, right[:rank].T * root


def _kron_map(factors: ModuleFactors, module: TrackedModule, k_out: int, k_in: int,
              generator: torch.Generator, query_rank: int) -> BlockMap:
    """A random Kronecker projection whose inner products estimate the EK-FAC score without bias.

    The score is ``Σ_ij G̃q_ij G̃m_ij W_ij`` in the eigenbasis, ``W = (Λ + λ)⁻¹``.
    With ``p_i q_j ≈ W_ij^½`` (a separable fit) and Gaussian ``R`` of variance
    1/k, the training row ``R_out diag(p) G̃_m diag(q) R_inᵀ`` costs only
    ``T·(k_out·d_out + k_in·d_in)`` (the maps fold in Q_S and Q_A).  The query
    row is ``R_out diag(1/p) (G̃_q ∘ W) diag(1/q) R_inᵀ``, so that
    ``E[⟨row_q, row_m⟩]`` is the score.  Made from the query's inverse-HVP in
    the eigenbasis it would cost a rotation into the full eigenbases,
    ``T·(d_out² + d_in²)``: more than the query's forward and backward at
    GPT-2-small width.  Instead ``W`` is replaced by its best rank-r
    approximation ``Σ_r u_r v_rᵀ``, and ``G̃_q ∘ u vᵀ = diag(u) G̃_q diag(v)``
    folds into maps like the training side's, ``r`` of them
    (:data:`QUERY_RANK`: the approximation's error is the eigenvalues' own
    sampling noise).  The separable part only whitens both sides alike, which
    keeps the estimate's variance near that of a projection of the
    preconditioned gradients themselves.
    """
    factors = factors.to(device="cpu", dtype=torch.float64)
    if factors.diagonal is None:
        root = torch.ones(module.d_out, module.d_in, dtype=torch.float64)
    else:
        root = (factors.diagonal.clamp_min(0) + factors.damping).rsqrt()
    p, q = _separable_root(root)
    out_basis, in_basis = _bases(factors, module)
    r_out = torch.randn(k_out, module.d_out, generator=generator, dtype=torch.float64) / k_out ** 0.5
    r_in = torch.randn(k_in, module.d_in, generator=generator, dtype=torch.float64) / k_in ** 0.5
    u, v = _low_rank(root.pow(2), query_rank, generator)  # (d_out, r), (d_in, r)
    # the query maps in the eigenbasis, (d_out, r·k_out): column j·k_out + c is u_j / p ∘ r_out[c]
    query_out = ((u / p[:, None])[:, :, None] * r_out.T[:, None]).flatten(1)
    query_inp = ((v / q[:, None])[:, :, None] * r_in.T[:, None]).flatten(1)
    return BlockMap(out=_product(out_basis, (r_out * p).T), inp=_product(in_basis, (r_in * q).T),
                    inverse_scale=torch.ones(k_out, k_in, dtype=torch.float64),
                    query_out=_product(out_basis, query_out), query_inp=_product(in_basis, query_inp))


def _product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """A float64 product on the CPU through NumPy's BLAS (OpenBLAS): torch's runs at a sixth of
    its speed on this project's machines, where a GPT-2-small database's maps take 20 s instead of 3."""
    return torch.from_numpy(left.numpy() @ right.numpy())


def kron_layout(modules: list[TrackedModule], weights: Callable[[TrackedModule], torch.Tensor], row_bytes: int,
                normalized_index: bool = True) -> RowLayout:
    """Numbers per module in proportion to its expected self-influence (Σ of ``weights``,
    Λ/(Λ+λ) for fitted factors): a module's estimate is as noisy as its norms are large, and
    that share is its expected norm², so this spends the budget where the noise is.  Each
    module's k_out × k_in is near square."""
    budget = _budget(row_bytes, len(modules))
    shares = [float(weights(m).sum()) for m in modules]
    total = sum(shares) or 1.0
    blocks = []
    for module, share in zip(modules, shares):
        numbers = max(1, int(budget * share / total))
        k_out = max(1, min(module.d_out, int(numbers ** 0.5)))
        k_in = max(1, min(module.d_in, numbers // k_out))
        blocks.append((k_out, k_in))
    return RowLayout(tuple(modules), tuple(blocks), tuple(1.0 for _ in blocks), normalized_index, "kron")


def layout_from_weights(kind: str, modules: list[TrackedModule], weights: Callable[[TrackedModule], torch.Tensor],
                        row_bytes: int, normalized_index: bool = True) -> RowLayout:
    """The layout a fit makes of ``kind`` rows under ``row_bytes``, given each module's coordinate
    weights: what `attribdb plan` predicts without a fitted model."""
    if kind == "block":
        return plan_from_weights(modules, weights, row_bytes, normalized_index).layout
    return kron_layout(modules, weights, row_bytes, normalized_index)


def _budget(row_bytes: int, modules: int) -> int:
    """Numbers a row of ``row_bytes`` holds beside its squared norm; at least one per module."""
    number, norm = np.dtype(ROW_DTYPE).itemsize, np.dtype(SELF_INFLUENCE_DTYPE).itemsize
    budget = (row_bytes - norm) // number
    if budget < modules:
        raise ConfigError(f"row-bytes {row_bytes} cannot hold one number per module ({modules} modules need "
                          f"at least {modules * number + norm} bytes)")
    return budget


class RowProjection:
    """Turns a batch's captures into rows: a few small matrices per module.

    This is all a build needs of the factors, and all an index query needs
    for block rows; kron rows also need the query's exact inverse-HVP.
    """

    def __init__(self, layout: RowLayout, maps: dict[str, BlockMap]):
        self.layout, self.maps = layout, maps

    @classmethod
    def fit(cls, factors: Factors, row_bytes: int, kind: str, normalized_index: bool = True,
            seed: int = 0, query_rank: int = QUERY_RANK) -> "RowProjection":
        """The projection of a new database: ``kind`` rows under ``row_bytes``."""
        if kind == "block":
            return cls.from_plan(factors, plan_rows(factors, row_bytes, normalized_index))
        row_layout = kron_layout(factors.modules, _factor_weights(factors), row_bytes, normalized_index)
        generator = torch.Generator().manual_seed(seed)
        return cls(row_layout, {m.name: _kron_map(factors[m.name], m, k_out, k_in, generator, query_rank)
                                for m, (k_out, k_in) in zip(row_layout.modules, row_layout.blocks)})

    @classmethod
    def from_plan(cls, factors: Factors, plan: RowPlan) -> "RowProjection":
        """Block rows on the eigenvectors a plan keeps."""
        return cls(plan.layout, {m.name: _block_map(factors[m.name], m, plan.out_index[m.name], plan.in_index[m.name])
                                 for m in plan.layout.modules})

    def to(self, device=None, dtype=None) -> "RowProjection":
        return RowProjection(self.layout, {name: b.to(device, dtype) for name, b in self.maps.items()})

    def encode(self, captures: dict[str, Capture]) -> torch.Tensor:
        """(B, dim) training rows, in the captures' dtype and device."""
        return torch.cat([self.maps[m.name].block(captures[m.name]).flatten(1) for m in self.layout.modules], dim=1)

    def encode_query(self, captures: dict[str, Capture]) -> torch.Tensor:
        """(B, dim) query rows, what training rows are matched with, from the queries' captures
        alone: block rows are symmetric, kron rows apply the inverse curvature in their maps."""
        if self.layout.kind == "block":
            return self.encode(captures)
        return torch.cat([self.maps[m.name].query_block(captures[m.name]).flatten(1) for m in self.layout.modules],
                         dim=1)

    def save(self, path: Path) -> None:
        """safetensors (no pickle), written to a temporary name and renamed."""
        from safetensors.torch import save_file

        tensors = {f"{name}/{key}": getattr(b, key).float().cpu().contiguous()
                   for name, b in self.maps.items() for key in BlockMap.TENSORS if getattr(b, key) is not None}
        header = {"format_version": PROJECTION_FORMAT_VERSION, "layout": self.layout.to_dict()}
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        save_file(tensors, str(tmp), metadata={"attribdb": json.dumps(header)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, layout: RowLayout) -> "RowProjection":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path} is missing: run `attribdb fit` again")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["attribdb"])
                stored = set(handle.keys())
                maps = {m.name: BlockMap(*(handle.get_tensor(f"{m.name}/{key}") if f"{m.name}/{key}" in stored
                                           else None for key in BlockMap.TENSORS)) for m in layout.modules}
        except Exception as exc:  # safetensors, JSON and missing keys all mean the same: unreadable
            raise StoreError(f"cannot read the row projections {path}: {exc!r}") from exc
        stored_layout = header.get("layout", {})
        if header.get("format_version") != PROJECTION_FORMAT_VERSION:
            raise StoreError(f"{path} holds row projections of format {header.get('format_version')}; this attribdb "
                             f"reads format {PROJECTION_FORMAT_VERSION}: build the database again")
        if (stored_layout.get("kind"), stored_layout.get("blocks")) != (layout.kind, layout.to_dict()["blocks"]):
            raise StoreError(f"{path} does not match the manifest's row layout: the database is damaged")
        for module, (k_out, k_in) in zip(layout.modules, layout.blocks):
            expected = {"out": (module.d_out, k_out), "inp": (module.d_in, k_in)}
            block = maps[module.name]
            if layout.kind == "kron":
                terms = block.query_out.shape[1] // k_out if block.query_out is not None else 0
                expected |= {"query_out": (module.d_out, terms * k_out), "query_inp": (module.d_in, terms * k_in)}
            found = {key: tuple(getattr(block, key).shape) for key in expected if getattr(block, key) is not None}
            if found != expected:
                raise StoreError(f"{path}: the projections of {module.name} have the wrong shape")
        return cls(layout, maps)


# ---- storage and scoring -------------------------------------------------------


def to_stored(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows in float16, squared norms in float32): what the row store holds."""
    squared = rows.double().pow(2).sum(1)
    norms = squared.sqrt().to(rows.dtype).unsqueeze(1)
    unit = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), torch.zeros_like(rows))
    return unit.to(torch.float16).cpu().numpy(), squared.cpu().numpy().astype(SELF_INFLUENCE_DTYPE)


def check_stored(unit_rows: np.ndarray, self_influence: np.ndarray, where: str) -> None:
    """Stored rows are unit vectors (zero where the gradient was zero): a row of another length was
    not written by a build, whatever its checksum says."""
    norms = np.linalg.norm(unit_rows.astype(np.float64), axis=1)
    expected = (self_influence > 0).astype(np.float64)
    bad = np.flatnonzero(np.abs(norms - expected) > 1e-2)
    if len(bad):
        raise StoreError(f"{where}: row {bad[0]} has norm {norms[bad[0]]:.4f} where {expected[bad[0]]:.0f} was stored")


def index_dim(dim: int) -> int:
    """The dimension FAISS holds rows at: ``dim`` padded with zeros to a multiple of
    :data:`INDEX_DIM_MULTIPLE`, where its SIMD kernels apply.  Measured on this project's machines
    (faiss-cpu 1.15, one thread): a flat float16 scan of 945 rows took 48 ms at 15,982 dimensions
    and 8 ms at 15,984; 2.8 ms at 300 and 0.12 ms at 304."""
    return -(-dim // INDEX_DIM_MULTIPLE) * INDEX_DIM_MULTIPLE


def index_vectors(unit_rows: np.ndarray, self_influence: np.ndarray, normalized: bool) -> np.ndarray:
    """What FAISS holds: unit rows (ranking by cosine) or rows at their own length (by score),
    zero-padded to :func:`index_dim`."""
    vectors = np.asarray(unit_rows, dtype=np.float32)
    vectors = np.pad(vectors, ((0, 0), (0, index_dim(vectors.shape[1]) - vectors.shape[1])))
    if normalized:
        return vectors
    return vectors * np.sqrt(np.maximum(np.asarray(self_influence, dtype=np.float32), 0))[:, None]


def module_scores(layout: RowLayout, queries: torch.Tensor, unit_rows: torch.Tensor,
                  self_influence: torch.Tensor) -> torch.Tensor:
    """(Q, N, modules) compressed scores ``⟨v_q, v_m⟩`` per module, from query rows (Q, dim) and
    stored unit rows (N, dim) with their squared norms (N,)."""
    unit_rows = unit_rows.to(queries.dtype)
    scale = self_influence.to(queries.dtype).clamp_min(0).sqrt()
    return torch.stack([(queries[:, s] @ unit_rows[:, s].T) * scale for s in layout.slices.values()], dim=-1)
