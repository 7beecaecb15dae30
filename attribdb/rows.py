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
MAX_SIDE = 512  # eigenvectors considered per side: keeps planning memory bounded on 7B-wide layers
PROJECTION_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RowLayout:
    """Where each module's block lives in a row, and how large it is."""

    modules: tuple[TrackedModule, ...]
    blocks: tuple[tuple[int, int], ...]  # (k_out, k_in) per module, in module order
    expected_kept: tuple[float, ...] = ()  # per module: expected share of self-influence the block keeps
    normalized_index: bool = True  # FAISS holds unit rows (ranks by cosine) rather than scaled ones

    def __post_init__(self):
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
        return self.dim * np.dtype(ROW_DTYPE).itemsize + 4

    @property
    def dense_bytes_per_row(self) -> int:
        """The uncompressed float32 Ĝ of every module, for comparison."""
        return 4 * sum(m.d_out * m.d_in for m in self.modules)

    def to_dict(self) -> dict:
        return {"blocks": {m.name: list(b) for m, b in zip(self.modules, self.blocks)},
                "expected_kept": list(self.expected_kept), "normalized_index": self.normalized_index}

    @classmethod
    def from_dict(cls, modules: list[TrackedModule], data: dict) -> "RowLayout":
        try:
            blocks = tuple(tuple(int(k) for k in data["blocks"][m.name]) for m in modules)
            return cls(tuple(modules), blocks, tuple(float(x) for x in data.get("expected_kept", ())),
                       bool(data.get("normalized_index", True)))
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


def plan_rows(factors: Factors, row_bytes: int, normalized_index: bool = True) -> RowPlan:
    """Spend ``row_bytes`` where the fitted factors expect the self-influence to be."""
    return plan_from_weights(factors.modules, lambda m: _coordinate_weights(factors[m.name], m.d_out, m.d_in),
                             row_bytes, normalized_index)


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
    budget = (row_bytes - 4) // np.dtype(ROW_DTYPE).itemsize
    modules = list(modules)
    if budget < len(modules):
        raise ConfigError(f"row-bytes {row_bytes} cannot hold one number per module ({len(modules)} modules need "
                          f"at least {len(modules) * np.dtype(ROW_DTYPE).itemsize + 4} bytes)")
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
    """One module's map from captures to its block."""

    out: torch.Tensor  # (d_out, k_out): the kept eigenvectors of S
    inp: torch.Tensor  # (d_in, k_in): the kept eigenvectors of A
    inverse_scale: torch.Tensor  # (k_out, k_in): 1/√(Λ_block + λ)

    def to(self, device=None, dtype=None) -> "BlockMap":
        return BlockMap(*(t.to(device=device, dtype=dtype) for t in (self.out, self.inp, self.inverse_scale)))

    def block(self, capture: Capture) -> torch.Tensor:
        """(B, k_out, k_in): the preconditioned gradient's block, from (B, T, d) captures."""
        grads_out = capture.grads_out @ self.out.to(capture.grads_out.dtype)  # (B, T, k_out)
        acts = capture.acts @ self.inp.to(capture.acts.dtype)  # (B, T, k_in)
        return torch.einsum("bto,bti->boi", grads_out, acts) * self.inverse_scale.to(acts.dtype)


def _block_map(factors: ModuleFactors, module: TrackedModule, out_index: torch.Tensor,
               in_index: torch.Tensor) -> BlockMap:
    """Built once, at fit time, on the host (it is saved from there)."""
    factors = factors.to(device="cpu", dtype=torch.float64)

    def basis(eigvecs, size, index):
        return eigvecs[:, index] if eigvecs is not None else torch.eye(size, dtype=torch.float64)[:, index]

    if factors.diagonal is None:  # identity strategy: nothing to divide by
        denominator = torch.ones(len(out_index), len(in_index), dtype=torch.float64)
    else:
        denominator = factors.diagonal[out_index][:, in_index].clamp_min(0) + factors.damping
    if not torch.all(denominator > 0):
        raise ConfigError(f"module {module.name}: Λ + λ is 0 on kept coordinates; use a positive damping")
    return BlockMap(basis(factors.eigvecs_out, module.d_out, out_index), basis(factors.eigvecs_in, module.d_in, in_index),
                    denominator.rsqrt())


class RowProjection:
    """Turns a batch's captures into rows: a few small matrices per module.

    This is all a build or an index query needs of the factors: the query
    process never holds the full eigenbases.
    """

    def __init__(self, layout: RowLayout, maps: dict[str, BlockMap]):
        self.layout, self.maps = layout, maps

    @classmethod
    def from_plan(cls, factors: Factors, plan: RowPlan) -> "RowProjection":
        maps = {m.name: _block_map(factors[m.name], m, plan.out_index[m.name], plan.in_index[m.name])
                for m in plan.layout.modules}
        return cls(plan.layout, maps)

    def to(self, device=None, dtype=None) -> "RowProjection":
        return RowProjection(self.layout, {name: b.to(device, dtype) for name, b in self.maps.items()})

    def encode(self, captures: dict[str, Capture]) -> torch.Tensor:
        """(B, dim) rows, in the captures' dtype and device."""
        return torch.cat([self.maps[m.name].block(captures[m.name]).flatten(1) for m in self.layout.modules], dim=1)

    def save(self, path: Path) -> None:
        """safetensors (no pickle), written to a temporary name and renamed."""
        from safetensors.torch import save_file

        tensors = {f"{name}/{key}": getattr(b, key).float().cpu().contiguous()
                   for name, b in self.maps.items() for key in ("out", "inp", "inverse_scale")}
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
                maps = {m.name: BlockMap(*(handle.get_tensor(f"{m.name}/{key}") for key in ("out", "inp", "inverse_scale")))
                        for m in layout.modules}
        except Exception as exc:  # safetensors, JSON and missing keys all mean the same: unreadable
            raise StoreError(f"cannot read the row projections {path}: {exc!r}") from exc
        if header.get("format_version") != PROJECTION_FORMAT_VERSION or header.get("layout", {}).get("blocks") != \
                layout.to_dict()["blocks"]:
            raise StoreError(f"{path} does not match the manifest's row layout: the database is damaged")
        for module, (k_out, k_in) in zip(layout.modules, layout.blocks):
            block = maps[module.name]
            if block.out.shape != (module.d_out, k_out) or block.inp.shape != (module.d_in, k_in):
                raise StoreError(f"{path}: the projections of {module.name} have the wrong shape")
        return cls(layout, maps)


# ---- storage and scoring -------------------------------------------------------


def to_stored(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows in float16, squared norms in float32): what the row store holds."""
    squared = rows.double().pow(2).sum(1)
    norms = squared.sqrt().to(rows.dtype).unsqueeze(1)
    unit = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), torch.zeros_like(rows))
    return unit.to(torch.float16).cpu().numpy(), squared.float().cpu().numpy()


def index_vectors(unit_rows: np.ndarray, self_influence: np.ndarray, normalized: bool) -> np.ndarray:
    """What FAISS holds: unit rows (ranking by cosine) or rows at their own length (by score)."""
    vectors = np.asarray(unit_rows, dtype=np.float32)
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
