"""What a stored row is: each training sequence's preconditioned gradient, low-rank and in 4 bits.

A training sequence's influence on a query is ``Σ_modules ⟨Ĝ_q, Ĝ_m⟩`` with
``Ĝ = (Q_Sᵀ G Q_A) ⊘ sqrt(Λ + λ)`` (docs/design.md).  EK-FAC whitening makes
``Ĝ`` nearly isotropic over many coordinates, so no fixed linear compression
of a few thousand numbers keeps the score: a random projection adds noise of
about 1/√dim to every row's cosine, more than most rows' true cosine, and a
fixed block of eigen-coordinates drops most of the score's variance.  What a
per-sequence gradient does have is low rank: ``G = Σ_t δ_t a_tᵀ`` is a sum over
the sequence's tokens, and a handful of singular components carry most of it.

So a row keeps, per module, the best rank-r approximation of ``Ĝ`` restricted
to a subspace (the ``k_out`` eigenvectors of S and ``k_in`` of A with the most
expected influence; the whole space when it fits, as at the sizes measured in
docs/evidence.md), with the rank chosen *per row*: the singular components of
every module are taken largest first (σ² per byte) until the row's byte budget
is spent.  Each component is two 4-bit vectors with a float32 scale each
(σ folded into the first).  The score of a query against a row is
``Σ_components u_rᵀ Ĝ_q,block v_r``: exact up to the components dropped, with
no noise added to rows the query has nothing to do with.  The row's squared
norm ``‖Ĝ_block‖²`` is stored beside it (the exact self-influence when the
subspace is the whole space) for the cosine ranking.

FAISS cannot hold a sum of bilinear forms, so each row also has a *sketch*:
``z_c = Σ_r (R_cᵀ u_r)(S_cᵀ v_r)`` for a few hundred Gaussian pairs
``(R_c, S_c)`` per module (a Khatri-Rao product), whose inner product with the
query's ``z_c = R_cᵀ Ĝ_q S_c`` is an unbiased estimate of the row's score.  It
only picks candidates; their scores come from the factors.  The sketch is
recomputed from the stored factors, so it is a function of the row store.

Everything that knows this format lives here; a change of representation
should touch this module alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attribdb.errors import ConfigError, StoreError
from attribdb.factors import Factors, ModuleFactors
from attribdb.tracking import Capture, TrackedModule

ROW_DTYPE = np.uint8  # the payload: ranks, scales and 4-bit codes
SELF_INFLUENCE_DTYPE = np.float32
CODE_LEVELS = 7  # 4-bit codes hold -7..7 (stored as 1..15; 8 is zero)
SCALE_BYTES = 8  # two float32 scales per component
MAX_RANK = 255  # a module's rank in a row is one byte of the header
SKETCH_DIM = 4096  # the FAISS vector's width, spread over modules by expected influence
INDEX_DIM_MULTIPLE = 16  # FAISS's SIMD kernels want multiples of 16 dimensions
PROJECTION_FORMAT_VERSION = 3
# Subspace sides tried when a fit chooses the row layout (None: the whole side); the one whose rows
# keep the most of the sample's self-influence wins (:func:`choose_subspaces`).
SIDE_CAPS = (None, 1024, 512, 256, 128, 64, 32, 16)
PLANNING_SEQUENCES = 32  # fit-sample sequences the choice is measured on
OVERSAMPLE, POWER_ITERATIONS = 8, 2  # of the randomized SVD (Halko, Martinsson and Tropp, 2011)


@dataclass(frozen=True)
class RowLayout:
    """Per module the subspace a row lives in, and the fixed byte size of every row's payload."""

    modules: tuple[TrackedModule, ...]
    subspaces: tuple[tuple[int, int], ...]  # (k_out, k_in) per module, in module order
    payload_bytes: int
    sketch_widths: tuple[int, ...]  # sketch coordinates per module
    kept: float = 0.0  # the planning sample's mean share of self-influence a row keeps
    normalized_index: bool = True  # FAISS ranks by the sketch over √self-influence (cosine) or by the sketch

    def __post_init__(self):
        if not len(self.modules) == len(self.subspaces) == len(self.sketch_widths):
            raise ConfigError("a row layout needs one subspace and one sketch width per module")
        if self.payload_bytes < self.header_bytes:
            raise ConfigError(f"a row payload of {self.payload_bytes} bytes cannot hold its header")

    @property
    def header_bytes(self) -> int:
        return len(self.modules)

    def component_bytes(self, index: int) -> int:
        """Bytes of one singular component of module ``index``: two scales, then u's and v's codes."""
        k_out, k_in = self.subspaces[index]
        return SCALE_BYTES + (k_out + 1) // 2 + (k_in + 1) // 2

    def most_components(self, index: int) -> int:
        """The most singular components of module ``index`` one row can hold."""
        k_out, k_in = self.subspaces[index]
        return min(k_out, k_in, MAX_RANK, (self.payload_bytes - self.header_bytes) // self.component_bytes(index))

    @property
    def sketch_dim(self) -> int:
        return sum(self.sketch_widths)

    @property
    def index_dim(self) -> int:
        """The sketch zero-padded to a multiple of :data:`INDEX_DIM_MULTIPLE`, as FAISS holds it."""
        return -(-self.sketch_dim // INDEX_DIM_MULTIPLE) * INDEX_DIM_MULTIPLE

    @property
    def bytes_per_row(self) -> int:
        """What one row costs in the row store: its payload and its float32 self-influence."""
        return self.payload_bytes + np.dtype(SELF_INFLUENCE_DTYPE).itemsize

    @property
    def dense_bytes_per_row(self) -> int:
        """The uncompressed float32 Ĝ of every module, for comparison."""
        return 4 * sum(m.d_out * m.d_in for m in self.modules)

    @property
    def whole_space(self) -> bool:
        """Every subspace is the module's whole space: the stored self-influence is exact."""
        return all((m.d_out, m.d_in) == s for m, s in zip(self.modules, self.subspaces))

    def to_dict(self) -> dict:
        return {"format": "lowrank-int4", "subspaces": {m.name: list(s) for m, s in zip(self.modules, self.subspaces)},
                "payload_bytes": self.payload_bytes,
                "sketch_widths": {m.name: w for m, w in zip(self.modules, self.sketch_widths)},
                "kept": self.kept, "normalized_index": self.normalized_index}

    @classmethod
    def from_dict(cls, modules: list[TrackedModule], data: dict) -> "RowLayout":
        try:
            if data.get("format") != "lowrank-int4":
                raise StoreError(f"rows of format {data.get('format', data.get('kind'))!r}, which this attribdb "
                                 "does not read: build the database again")
            return cls(tuple(modules), tuple(tuple(int(k) for k in data["subspaces"][m.name]) for m in modules),
                       int(data["payload_bytes"]), tuple(int(data["sketch_widths"][m.name]) for m in modules),
                       float(data.get("kept", 0.0)), bool(data.get("normalized_index", True)))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"the manifest's row layout is damaged: {exc!r}") from exc


# ---- choosing subspaces ------------------------------------------------------------


def _coordinate_share(factors: ModuleFactors, d_out: int, d_in: int) -> torch.Tensor:
    """Λ/(Λ+λ): the expected share of self-influence each eigen-coordinate carries (float64)."""
    if factors.diagonal is None:  # identity strategy: every coordinate alike
        return torch.ones(d_out, d_in, dtype=torch.float64)
    diagonal = factors.diagonal.double().clamp_min(0)
    denominator = diagonal + factors.damping
    return torch.where(denominator > 0, diagonal / denominator.clamp_min(1e-300), torch.zeros_like(diagonal))


def _side_orders(factors: Factors, module: TrackedModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of S and of A ordered by the expected influence they carry, largest first."""
    share = _coordinate_share(factors[module.name], module.d_out, module.d_in)
    return (torch.argsort(share.sum(1), descending=True, stable=True),
            torch.argsort(share.sum(0), descending=True, stable=True))


def _subspaces_for(modules: list[TrackedModule], cap: int | None) -> tuple[tuple[int, int], ...]:
    return tuple((min(m.d_out, cap or m.d_out), min(m.d_in, cap or m.d_in)) for m in modules)


# The most a row's encoding may cost, as a share of its forward and backward pass: a build then costs
# at most two passes a row.  At 0.5 a 4×256 model's rows were capped at 128 eigenvectors a side and kept
# 0.28 of a sequence's self-influence (rescore=0 Spearman 0.764, recall@10 0.880); at 1.0, 256 a side,
# 0.55 (0.859, 0.960; tools/evaluations/eval_rows.py, docs/evidence.md)
ENCODE_SHARE = 1.0
ENCODE_FLOOR = 1e9  # floating-point operations a row may always cost (~50 ms of one core): small models


def _affordable(modules: list[TrackedModule], subspaces, tokens: int = 128) -> bool:
    """Whether encoding a row on these subspaces costs at most :data:`ENCODE_SHARE` of the
    sequence's forward and backward pass (~6·T·d_out·d_in a module), so a build stays within twice
    a training step's time: projecting the tokens onto the subspace (2·T·(d_out·k_out + d_in·k_in)),
    forming the block (2·T·k_out·k_in) and its randomized SVD (~(r + p)·k_out·k_in·(4q + 4) for
    the r ≤ min(k_out, k_in) components a row could keep).  Small models, whose pass is mostly their
    embeddings, may always spend :data:`ENCODE_FLOOR`."""
    encode = sum(2 * tokens * (m.d_out * k_out + m.d_in * k_in + k_out * k_in)
                 + (min(k_out, k_in, 64) + OVERSAMPLE) * k_out * k_in * (4 * POWER_ITERATIONS + 4)
                 for m, (k_out, k_in) in zip(modules, subspaces))
    return encode <= max(ENCODE_FLOOR, ENCODE_SHARE * 6 * tokens * sum(m.d_out * m.d_in for m in modules))


def allocate(singular_values: list[torch.Tensor], costs: list[int], budget: int) -> np.ndarray:
    """(B, modules) ranks: per row, singular components of every module largest σ² per byte first,
    as many as ``budget`` bytes hold.  ``singular_values[m]`` is (B, r_m) in descending order, so the
    components taken of a module are always its first ones (equal costs keep σ²'s order)."""
    batch = singular_values[0].shape[0] if singular_values else 0
    ranks = np.zeros((batch, len(costs)), dtype=np.int64)
    values = [s.double().cpu().numpy() for s in singular_values]
    for b in range(batch):
        gains = np.concatenate([v[b] ** 2 / c for v, c in zip(values, costs)])
        owner = np.concatenate([np.full(v.shape[1], m) for m, v in enumerate(values)])
        left = budget
        for i in np.argsort(-gains, kind="stable"):
            m = owner[i]
            if gains[i] <= 0 or ranks[b, m] >= MAX_RANK:
                continue
            if costs[m] <= left:
                ranks[b, m] += 1
                left -= costs[m]
    return ranks


def choose_subspaces(factors: Factors, sample: Iterable[dict[str, Capture]], payload_bytes: int) -> tuple[tuple, float]:
    """(subspaces, mean kept share): of the side caps :data:`SIDE_CAPS` a build can afford, the one
    whose rows keep the largest share of the sample sequences' self-influence under the budget.

    A larger subspace holds more of each gradient but makes every component dearer; which wins
    depends on the model and its data, so it is measured on the fit's own sample."""
    modules = factors.modules
    orders = {m.name: _side_orders(factors, m) for m in modules}
    options = []
    for cap in SIDE_CAPS:
        subspaces = _subspaces_for(modules, cap)
        if subspaces not in [s for s, _ in options] and _affordable(modules, subspaces):
            options.append((subspaces, 0.0))
    if not options:
        options.append((_subspaces_for(modules, SIDE_CAPS[-1]), 0.0))
    kept = {subspaces: [] for subspaces, _ in options}
    layouts = {subspaces: RowLayout(tuple(modules), subspaces, payload_bytes, tuple(1 for _ in modules))
               for subspaces in kept}
    for captures in sample:
        # one module's dense Ĝ at a time: at GPT-2-small shape all of them are 340 MB a sequence
        total, values = 0.0, {subspaces: [] for subspaces in kept}
        for i, m in enumerate(modules):
            whitened = factors[m.name].half_precondition(factors[m.name].rotated_gradients(captures[m.name]))
            total = total + whitened.flatten(1).double().pow(2).sum(1)
            for subspaces, layout in layouts.items():
                k_out, k_in = subspaces[i]
                values[subspaces].append(top_components(_restricted(whitened, orders[m.name], k_out, k_in),
                                                        layout.most_components(i))[1])
            del whitened
        for subspaces, layout in layouts.items():
            ranks = allocate(values[subspaces], [layout.component_bytes(i) for i in range(len(modules))],
                             payload_bytes - layout.header_bytes)
            held = sum(_kept_energy(v, ranks[:, i]) for i, v in enumerate(values[subspaces]))
            kept[subspaces].extend((held / total.clamp_min(1e-300)).tolist())
    best = max(kept, key=lambda s: (float(np.mean(kept[s])) if kept[s] else 0.0))
    return best, float(np.mean(kept[best])) if kept[best] else 0.0


def _restricted(blocks: torch.Tensor, orders: tuple[torch.Tensor, torch.Tensor], k_out: int, k_in: int):
    """(B, k_out, k_in) the coordinates of the first ``k_out`` and ``k_in`` eigenvectors in ``orders``."""
    return blocks[:, orders[0][:k_out]][:, :, orders[1][:k_in]]


def _kept_energy(values: torch.Tensor, ranks: np.ndarray) -> torch.Tensor:
    """Σ of the first ``ranks[b]`` squared singular values of each row b."""
    mask = torch.arange(values.shape[1])[None, :] < torch.as_tensor(ranks)[:, None]
    return (values.double().pow(2) * mask).sum(1)


def top_components(blocks: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (B, m, r), σ (B, r), Vᴴ (B, r, n)): the ``rank`` largest singular triplets of each (m, n)
    block.  An exact SVD where the rank is near the smaller side; otherwise a randomized range
    finder with a fixed seed (the same block always gives the same row, so a resumed build stores
    what an uninterrupted one does), ``rank·m·n`` work instead of ``min(m, n)·m·n``."""
    batch, m, n = blocks.shape
    rank = max(0, min(rank, m, n))
    if rank + OVERSAMPLE >= min(m, n):
        u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
        return u[..., :rank], s[:, :rank], vh[:, :rank]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(n, rank + OVERSAMPLE, generator=generator, dtype=blocks.dtype).to(blocks.device)
    basis = torch.linalg.qr(blocks @ probe).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(blocks @ torch.linalg.qr(blocks.transpose(1, 2) @ basis).Q).Q
    small_u, s, vh = torch.linalg.svd(basis.transpose(1, 2) @ blocks, full_matrices=False)
    return (basis @ small_u)[..., :rank], s[:, :rank], vh[:, :rank]


def sketch_widths(factors: Factors, dim: int = SKETCH_DIM) -> tuple[int, ...]:
    """Sketch coordinates per module in proportion to its expected self-influence, at least one
    each, ``dim`` in all (largest remainders round up): the index's width, and so its codes' bytes,
    is known before the fit (attribdb/row_costs.py prices it)."""
    shares = np.array([float(_coordinate_share(factors[m.name], m.d_out, m.d_in).sum()) for m in factors.modules])
    if len(shares) > dim:
        raise ConfigError(f"{len(shares)} tracked modules need a sketch of at least as many coordinates ({dim})")
    ideal = 1 + (dim - len(shares)) * shares / (shares.sum() or 1.0)
    widths = np.floor(ideal).astype(np.int64)
    widths[np.argsort(widths - ideal, kind="stable")[:dim - widths.sum()]] += 1
    return tuple(int(w) for w in widths)


# ---- the maps a fit makes ------------------------------------------------------------


@dataclass
class SubspaceMap:
    """One module's subspace: captures → ``Ĝ`` on it, and the sketch's Gaussian pairs."""

    out: torch.Tensor  # (d_out, k_out): the kept eigenvectors of S
    inp: torch.Tensor  # (d_in, k_in): of A
    inverse_root: torch.Tensor  # (k_out, k_in): 1/√(Λ+λ) on the subspace
    sketch_out: torch.Tensor  # (k_out, width)
    sketch_in: torch.Tensor  # (k_in, width)

    TENSORS = ("out", "inp", "inverse_root", "sketch_out", "sketch_in")

    def to(self, device=None, dtype=None) -> "SubspaceMap":
        return SubspaceMap(*(getattr(self, key).to(device=device, dtype=dtype) for key in self.TENSORS))

    def block(self, capture: Capture) -> torch.Tensor:
        """(B, k_out, k_in) ``Ĝ`` on the subspace: ``Σ_t (outᵀ δ_t)(inpᵀ a_t)ᵀ ∘ 1/√(Λ+λ)``."""
        grads_out = capture.grads_out @ self.out.to(capture.grads_out.dtype)
        acts = capture.acts @ self.inp.to(capture.acts.dtype)
        return torch.einsum("bto,bti->boi", grads_out, acts) * self.inverse_root.to(acts.dtype)

    def query_sketch(self, blocks: torch.Tensor) -> torch.Tensor:
        """(Q, width) ``R_cᵀ B S_c / √width`` of (Q, k_out, k_in) blocks."""
        sketch_in = self.sketch_in.to(blocks.dtype)
        return ((blocks @ sketch_in) * self.sketch_out.to(blocks.dtype)).sum(1) / math.sqrt(sketch_in.shape[1])

    def factor_sketch(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """(n, width) sketches of rank-1 components ``left_n right_nᵀ`` (n, k_out), (n, k_in)."""
        width = self.sketch_in.shape[1]
        return (left @ self.sketch_out.to(left.dtype)) * (right @ self.sketch_in.to(right.dtype)) / math.sqrt(width)


def _subspace_map(factors: ModuleFactors, module: TrackedModule, out_index: torch.Tensor, in_index: torch.Tensor,
                  width: int, generator: torch.Generator) -> SubspaceMap:
    """Built once, at fit time, on the host (it is saved from there)."""
    factors = factors.to(device="cpu", dtype=torch.float64)
    if factors.diagonal is None:
        denominator = torch.ones(len(out_index), len(in_index), dtype=torch.float64)
    else:
        denominator = factors.diagonal[out_index][:, in_index].clamp_min(0) + factors.damping
    if not torch.all(denominator > 0):
        raise ConfigError(f"module {module.name}: Λ + λ is 0 on kept coordinates; use a positive damping")
    if factors.eigvecs_out is None:
        out_basis = torch.eye(module.d_out, dtype=torch.float64)[:, out_index]
        in_basis = torch.eye(module.d_in, dtype=torch.float64)[:, in_index]
    else:
        out_basis, in_basis = factors.eigvecs_out[:, out_index], factors.eigvecs_in[:, in_index]
    return SubspaceMap(out_basis, in_basis, denominator.rsqrt(),
                       torch.randn(len(out_index), width, generator=generator, dtype=torch.float64),
                       torch.randn(len(in_index), width, generator=generator, dtype=torch.float64))


# ---- payloads: components ↔ bytes ------------------------------------------------------


def _quantize(vectors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, k) in 1..15, scales (n,)) of (n, k) vectors: symmetric 4-bit, one scale each."""
    values = vectors.double().cpu().numpy()
    scales = np.abs(values).max(axis=1) / CODE_LEVELS
    safe = np.where(scales > 0, scales, 1.0)
    codes = np.clip(np.rint(values / safe[:, None]), -CODE_LEVELS, CODE_LEVELS).astype(np.int64) + 8
    return codes.astype(np.uint8), scales.astype(np.float32)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(n, k) codes → (n, ⌈k/2⌉) bytes, the first code of each pair in the low nibble."""
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.full((len(codes), 1), 8, np.uint8)], axis=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, length: int, scales: np.ndarray) -> np.ndarray:
    """(n, ⌈k/2⌉) bytes → (n, k) float32 codes in -7..7 times each row's scale (n, 1): split by
    bit masks, not a table lookup, which cost seven times as long."""
    codes = np.empty((packed.shape[0], 2 * packed.shape[1]), np.uint8)
    np.bitwise_and(packed, 15, out=codes[:, 0::2])
    np.right_shift(packed, 4, out=codes[:, 1::2])
    values = codes[:, :length].astype(np.float32)
    values -= 8
    values *= scales
    return values


@dataclass
class Components:
    """One module's stored singular components across rows: which row each belongs to, and its
    dequantized ``σu`` (n, k_out) and ``v`` (n, k_in)."""

    rows: np.ndarray
    left: np.ndarray
    right: np.ndarray


def _offsets(layout: RowLayout, ranks: np.ndarray) -> np.ndarray:
    """(N, modules) byte offset of each module's first component in each row's payload."""
    sizes = ranks * np.array([layout.component_bytes(i) for i in range(len(layout.modules))])
    return layout.header_bytes + np.cumsum(sizes, axis=1) - sizes


def pack(layout: RowLayout, ranks: np.ndarray, left: list[torch.Tensor], right: list[torch.Tensor]) -> np.ndarray:
    """(B, payload_bytes) payloads from per-module ranks (B, modules) and components: ``left[m]`` is
    (B, r_m, k_out) σ·u and ``right[m]`` (B, r_m, k_in) v, of which row b keeps the first ranks[b, m]."""
    batch = ranks.shape[0]
    payloads = np.zeros((batch, layout.payload_bytes), dtype=ROW_DTYPE)
    payloads[:, :layout.header_bytes] = ranks
    offsets = _offsets(layout, ranks)
    for m in range(len(layout.modules)):
        owners = np.repeat(np.arange(batch), ranks[:, m])
        within = np.concatenate([np.arange(r) for r in ranks[:, m]]) if owners.size else np.zeros(0, np.int64)
        if not owners.size:
            continue
        picked = (torch.as_tensor(owners), torch.as_tensor(within))
        u_codes, u_scales = _quantize(left[m][picked])
        v_codes, v_scales = _quantize(right[m][picked])
        record = np.concatenate([u_scales[:, None].view(np.uint8), v_scales[:, None].view(np.uint8),
                                 _pack_nibbles(u_codes), _pack_nibbles(v_codes)], axis=1)
        starts = offsets[owners, m] + within * layout.component_bytes(m)
        payloads[owners[:, None], starts[:, None] + np.arange(record.shape[1])] = record
    return payloads


def unpack(layout: RowLayout, payloads: np.ndarray) -> list[Components]:
    """Every module's components of (N, payload_bytes) payloads, dequantized, gathered in one
    indexing per module (a loop over rows cost half a millisecond a row)."""
    payloads = np.ascontiguousarray(payloads)
    flat = payloads.reshape(-1)  # one flat gather per module is three times as fast as a 2-d one
    ranks = payloads[:, :layout.header_bytes].astype(np.int64)
    offsets = _offsets(layout, ranks)
    out = []
    for m, (k_out, k_in) in enumerate(layout.subspaces):
        size = layout.component_bytes(m)
        owners = np.repeat(np.arange(len(payloads)), ranks[:, m])
        within = np.arange(len(owners)) - np.repeat(np.cumsum(ranks[:, m]) - ranks[:, m], ranks[:, m])
        starts = offsets[owners, m] + within * size
        record = flat[(owners * payloads.shape[1] + starts)[:, None] + np.arange(size)]
        scales = np.ascontiguousarray(record[:, :SCALE_BYTES]).view(np.float32)
        u_bytes = SCALE_BYTES + (k_out + 1) // 2
        left = _unpack_nibbles(record[:, SCALE_BYTES:u_bytes], k_out, scales[:, :1])
        right = _unpack_nibbles(record[:, u_bytes:], k_in, scales[:, 1:2])
        out.append(Components(owners, left, right))
    return out


def check_payloads(layout: RowLayout, payloads: np.ndarray) -> None:
    """Refuse payloads whose header does not fit the layout (a damaged row store would otherwise
    be read as garbage factors)."""
    ranks = np.asarray(payloads)[:, :layout.header_bytes].astype(np.int64)
    ends = _offsets(layout, ranks)[:, -1] + ranks[:, -1] * layout.component_bytes(len(layout.modules) - 1)
    limits = np.array([min(k_out, k_in) for k_out, k_in in layout.subspaces])
    if np.any(ends > layout.payload_bytes) or np.any(ranks > limits):
        raise StoreError("a stored row's header names more components than its payload holds: the row store is damaged")


def relative_difference(layout: RowLayout, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(N,) ‖A − B‖ / max(‖A‖, ‖B‖) of the low-rank blocks that two sets of payloads hold, from
    their components alone: ⟨A, B⟩ = Σ_ij (u_i·u'_j)(v_i·v'_j) per module."""
    inner = np.zeros((len(first), 3))  # ⟨A, A⟩, ⟨B, B⟩, ⟨A, B⟩
    for a, b in zip(unpack(layout, first), unpack(layout, second)):
        for row in range(len(first)):
            left_a, right_a = a.left[a.rows == row], a.right[a.rows == row]
            left_b, right_b = b.left[b.rows == row], b.right[b.rows == row]
            for j, (left, right, other_left, other_right) in enumerate(
                    ((left_a, right_a, left_a, right_a), (left_b, right_b, left_b, right_b),
                     (left_a, right_a, left_b, right_b))):
                inner[row, j] += float(np.sum((left.astype(np.float64) @ other_left.T)
                                              * (right.astype(np.float64) @ other_right.T)))
    squared = np.maximum(inner[:, 0] + inner[:, 1] - 2 * inner[:, 2], 0)
    return np.sqrt(squared) / np.maximum(np.sqrt(np.maximum(inner[:, :2].max(axis=1), 0)), 1e-300)


# ---- encoding and scoring --------------------------------------------------------------


@dataclass
class EncodedRows:
    """What the row store gets for a batch of training sequences (FAISS's sketches are made from
    the payloads, :meth:`RowProjection.sketches`)."""

    payloads: np.ndarray  # (B, payload_bytes) uint8
    self_influence: np.ndarray  # (B,) float32: ‖Ĝ_block‖², exact when the subspaces are whole


class RowProjection:
    """Turns captures into rows and queries into what rows are scored against.

    It holds only each module's subspace bases, ``1/√(Λ+λ)`` on them and the
    sketch's Gaussian pairs: all a build and an index query need of the fit.
    """

    def __init__(self, layout: RowLayout, maps: dict[str, SubspaceMap]):
        self.layout, self.maps = layout, maps

    @classmethod
    def fit(cls, factors: Factors, payload_bytes: int, sample: Iterable[dict[str, Capture]],
            normalized_index: bool = True, seed: int = 0) -> "RowProjection":
        """The projection of a new database: subspaces chosen on ``sample`` (captures of fit
        batches, :data:`PLANNING_SEQUENCES` sequences are plenty), payloads of ``payload_bytes``
        (what ``--row-bytes`` leaves once the rest of a row is paid: attribdb/row_costs.py)."""
        modules = list(factors.modules)
        smallest = len(modules) + SCALE_BYTES + 2
        if payload_bytes < smallest:
            raise ConfigError(f"a row payload of {payload_bytes} bytes cannot hold one component of "
                              f"{len(modules)} modules ({smallest} bytes): raise --row-bytes")
        payload = payload_bytes
        subspaces, kept = choose_subspaces(factors, sample, payload)
        layout = RowLayout(tuple(modules), subspaces, payload, sketch_widths(factors), kept, normalized_index)
        generator = torch.Generator().manual_seed(seed)
        maps = {}
        for m, (k_out, k_in), width in zip(modules, subspaces, layout.sketch_widths):
            out_order, in_order = _side_orders(factors, m)
            maps[m.name] = _subspace_map(factors[m.name], m, out_order[:k_out], in_order[:k_in], width, generator)
        return cls(layout, maps)

    def to(self, device=None, dtype=None) -> "RowProjection":
        return RowProjection(self.layout, {name: b.to(device, dtype) for name, b in self.maps.items()})

    def blocks(self, captures: dict[str, Capture]) -> dict[str, torch.Tensor]:
        """``Ĝ`` of each sequence on each module's subspace (B, k_out, k_in): a query's side of the
        score, and what a training row is the low-rank approximation of."""
        return {m.name: self.maps[m.name].block(captures[m.name]) for m in self.layout.modules}

    def encode(self, captures: dict[str, Capture]) -> EncodedRows:
        """Rows of a batch of training sequences."""
        blocks = self.blocks(captures)
        self_influence = sum(b.flatten(1).double().pow(2).sum(1) for b in blocks.values())
        left, right, values = [], [], []
        for index, block in enumerate(blocks.values()):
            u, s, vh = top_components(block.float(), self.layout.most_components(index))
            values.append(s)
            left.append((u * s[:, None, :]).transpose(1, 2))  # (B, r, k_out): σ·u
            right.append(vh)  # (B, r, k_in)
        costs = [self.layout.component_bytes(i) for i in range(len(self.layout.modules))]
        ranks = allocate(values, costs, self.layout.payload_bytes - self.layout.header_bytes)
        payloads = pack(self.layout, ranks, left, right)
        return EncodedRows(payloads, self_influence.float().cpu().numpy())

    def sketches(self, payloads: np.ndarray) -> np.ndarray:
        """(N, sketch_dim) sketches of stored rows, from their payloads alone."""
        parts = []
        for m, components in zip(self.layout.modules, unpack(self.layout, payloads)):
            sketch_map = self.maps[m.name]
            device, dtype = sketch_map.sketch_out.device, sketch_map.sketch_out.dtype
            part = torch.zeros(len(payloads), sketch_map.sketch_out.shape[1], dtype=dtype, device=device)
            if len(components.rows):
                values = sketch_map.factor_sketch(torch.from_numpy(components.left).to(device, dtype),
                                                  torch.from_numpy(components.right).to(device, dtype))
                part.index_add_(0, torch.from_numpy(components.rows).to(device), values)
            parts.append(part)
        return torch.cat(parts, dim=1).float().cpu().numpy()

    def index_vectors(self, payloads: np.ndarray, self_influence: np.ndarray) -> np.ndarray:
        """What FAISS holds of stored rows: their sketches, as :func:`index_vectors` lays them out."""
        return index_vectors(self.sketches(payloads), self_influence, self.layout.normalized_index)

    def queries(self, captures: dict[str, Capture]) -> QueryBlocks:
        """The queries' side of the score, from their measurement captures."""
        return QueryBlocks.of(self.blocks(captures))

    def query_sketches(self, queries: QueryBlocks) -> torch.Tensor:
        """(Q, sketch_dim) what FAISS matches the rows' sketches with."""
        return torch.cat([self.maps[m.name].query_sketch(queries.dense[m.name]) for m in self.layout.modules], dim=1)

    def save(self, path: Path) -> None:
        """safetensors (no pickle), written to a temporary name and renamed."""
        from safetensors.torch import save_file

        tensors = {f"{name}/{key}": getattr(b, key).float().cpu().contiguous()
                   for name, b in self.maps.items() for key in SubspaceMap.TENSORS}
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
                maps = {m.name: SubspaceMap(*(handle.get_tensor(f"{m.name}/{key}") for key in SubspaceMap.TENSORS))
                        for m in layout.modules}
        except Exception as exc:  # safetensors, JSON and missing keys all mean the same: unreadable
            raise StoreError(f"cannot read the row projections {path}: {exc!r}") from exc
        if header.get("format_version") != PROJECTION_FORMAT_VERSION:
            raise StoreError(f"{path} holds row projections of format {header.get('format_version')}; this attribdb "
                             f"reads format {PROJECTION_FORMAT_VERSION}: build the database again")
        if header.get("layout", {}).get("subspaces") != layout.to_dict()["subspaces"]:
            raise StoreError(f"{path} does not match the manifest's row layout: the database is damaged")
        for module, (k_out, k_in), width in zip(layout.modules, layout.subspaces, layout.sketch_widths):
            expected = {"out": (module.d_out, k_out), "inp": (module.d_in, k_in), "inverse_root": (k_out, k_in),
                        "sketch_out": (k_out, width), "sketch_in": (k_in, width)}
            if {key: tuple(getattr(maps[module.name], key).shape) for key in expected} != expected:
                raise StoreError(f"{path}: the projections of {module.name} have the wrong shape")
        return cls(layout, maps)


QUERY_ENERGY = 0.9999  # share of a query block's energy its low-rank form keeps (see QueryBlocks)
QUERY_MOST_RANK = 64  # and the most components it keeps, whatever the energy


@dataclass
class QueryBlocks:
    """Queries' side of the score, per module: ``Ĝ_q`` on the subspace (Q, k_out, k_in), and the
    same in low-rank form, ``Σ_k left_k right_kᵀ`` with ``left`` (Q, ρ, k_out) and ``right``
    (Q, ρ, k_in).  A query's gradient is a sum over its few completion tokens, so ρ ≈ 20 keeps
    99.99% of it on the demo model's modules, and scoring a stored component costs
    ``ρ·(k_out + k_in)`` instead of ``k_out·k_in``."""

    dense: dict[str, torch.Tensor]
    left: dict[str, torch.Tensor]
    right: dict[str, torch.Tensor]

    @classmethod
    def of(cls, dense: dict[str, torch.Tensor]) -> "QueryBlocks":
        left, right = {}, {}
        for name, block in dense.items():
            u, s, vh = top_components(block, QUERY_MOST_RANK)
            energy = s.pow(2).cumsum(1) / s.pow(2).sum(1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
            rank = int((energy < QUERY_ENERGY).sum(1).max()) + 1 if s.shape[1] else 0
            left[name] = (u[:, :, :rank] * s[:, None, :rank]).transpose(1, 2)
            right[name] = vh[:, :rank]
        return cls(dense, left, right)

    def one(self, i: int) -> "QueryBlocks":
        """Query ``i`` alone."""
        return QueryBlocks(*({name: block[i:i + 1] for name, block in part.items()}
                             for part in (self.dense, self.left, self.right)))

    def self_influence(self) -> torch.Tensor:
        """(Q,) ‖Ĝ_q‖² on the subspaces."""
        return sum(b.flatten(1).double().pow(2).sum(1) for b in self.dense.values())


TYPICAL_QUERY_RANK = 20  # components of a query's low-rank form on the demo model's modules (QueryBlocks)
# Scoring reads 4-bit codes through a table and multiplies short vectors: about a tenth of the rate of
# the dense products a forward and backward pass runs at (1 ms per demo row and query on one core)
SCORING_SLOWDOWN = 10


def scoring_flops(layout: RowLayout) -> float:
    """What scoring one stored row for one query costs, in operations of a forward and backward
    pass's speed: each payload byte holds two coded values, each multiplied with the query's
    components (:func:`module_scores`)."""
    return SCORING_SLOWDOWN * 2 * 2 * TYPICAL_QUERY_RANK * layout.payload_bytes


def module_scores(layout: RowLayout, queries: QueryBlocks, payloads: np.ndarray) -> torch.Tensor:
    """(Q, N, modules) scores ``Σ_r u_rᵀ Ĝ_q v_r`` of stored rows (N, payload_bytes), on the
    queries' device: per stored component, ``Σ_k (u_r·left_k)(v_r·right_k)`` over the query's
    low-rank form, all queries in one product per module."""
    first = next(iter(queries.dense.values()))
    count, device, dtype = first.shape[0], first.device, first.dtype
    out = torch.zeros(count, len(payloads), len(layout.modules), dtype=dtype, device=device)
    for m, (module, components) in enumerate(zip(layout.modules, unpack(layout, payloads))):
        if not len(components.rows):
            continue
        left, right = queries.left[module.name], queries.right[module.name]  # (Q, ρ, k)
        rank = left.shape[1]
        stored_left = torch.from_numpy(components.left).to(device, dtype)
        stored_right = torch.from_numpy(components.right).to(device, dtype)
        products = ((stored_left @ left.reshape(-1, left.shape[2]).T)
                    * (stored_right @ right.reshape(-1, right.shape[2]).T))
        values = products.view(len(components.rows), count, rank).sum(-1).T  # (Q, n)
        out[:, :, m].index_add_(1, torch.from_numpy(components.rows).to(device), values)
    return out


def index_vectors(sketches: np.ndarray, self_influence: np.ndarray, normalized: bool) -> np.ndarray:
    """What FAISS holds: each row's sketch, divided by √self-influence when it ranks by cosine,
    zero-padded to a multiple of :data:`INDEX_DIM_MULTIPLE` dimensions."""
    vectors = np.asarray(sketches, dtype=np.float32)
    if normalized:
        norms = np.sqrt(np.maximum(np.asarray(self_influence, dtype=np.float32), 0))
        vectors = vectors / np.where(norms > 0, norms, 1.0)[:, None]
    width = -(-vectors.shape[1] // INDEX_DIM_MULTIPLE) * INDEX_DIM_MULTIPLE
    return np.pad(vectors, ((0, 0), (0, width - vectors.shape[1])))
