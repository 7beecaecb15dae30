"""Fit curvature factors over a sample of training batches.

Two passes at most, each one forward and one backward per batch:

1. *Covariances* (kfac, ekfac): ``A = Σ_tokens a aᵀ / n_tokens`` and
   ``S = Σ_m Σ_t δ δᵀ / n_sequences``, so ``S ⊗ A`` approximates the Fisher of
   a whole sequence's gradient, then a float64 eigendecomposition of each.
2. *Diagonal* (diagonal, ekfac): ``D = E_m[(Q_Sᵀ G_m Q_A)²]`` over per-sequence
   pseudo-gradients, the eigenvalue correction of EK-FAC.

Labels are sampled from the model for the true Fisher, with a generator seeded
from the config so a fit is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attribdb.factors import Factors, FactorConfig, ModuleFactors, damping_for
from attribdb.gradients import GradientRunner
from attribdb.tasks import Task
from attribdb.tracking import Capture, TrackedModule

Progress = Callable[[int], None]  # called with the number of sequences just processed


@dataclass
class _Covariances:
    """Σ a aᵀ (d_in, d_in) and Σ δ δᵀ (d_out, d_out), float64, on the runner's device.

    Each batch's product is computed in the compute dtype (a float64 GEMM is
    many times slower on a GPU) and only the running sums are float64, so no
    batch leaves the device and no float64 copy of the captures is made.
    """

    acts: torch.Tensor
    grads: torch.Tensor

    @classmethod
    def zeros(cls, module: TrackedModule, device: torch.device) -> "_Covariances":
        return cls(torch.zeros(module.d_in, module.d_in, dtype=torch.float64, device=device),
                   torch.zeros(module.d_out, module.d_out, dtype=torch.float64, device=device))

    def add(self, capture) -> None:
        self.acts += gram(capture.acts.flatten(0, 1))
        self.grads += gram(capture.grads_out.flatten(0, 1))


def _through_numpy(tensor: torch.Tensor) -> bool:
    """Whether a product of ``tensor`` runs through NumPy's BLAS (OpenBLAS): on this project's (AMD)
    machines torch's CPU GEMM in float32 runs at about half of OpenBLAS's speed.  Other devices and
    dtypes keep torch."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rowsᵀ rows``.  Through NumPy on the CPU, whose matmul recognises a product of an array with
    its own transpose and calls BLAS ``syrk``: half the FLOPs of the general product torch runs, and
    5× faster than it at GPT-2-small width, where the covariances cost twice the model's own forward
    and backward."""
    if not _through_numpy(rows):
        return rows.T @ rows
    array = rows.detach().contiguous().numpy()
    return torch.from_numpy(array.T @ array)


def squared_rotated_gradients(basis: ModuleFactors, capture: Capture, dtype: torch.dtype) -> torch.Tensor:
    """``Σ_m (Q_Sᵀ G_m Q_A)²`` over a batch's sequences (d_out, d_in): the eigenvalue correction's sum.

    Each token's δ and a are rotated into the eigenbases (cheaper than rotating G when T < d), and
    each sequence's ``Σ_t (Q_Sᵀ δ_t)(Q_Aᵀ a_t)ᵀ`` is squared and added in place, so the batch's
    (B, d_out, d_in) gradients are never held.  The products run in ``dtype`` (the basis is already
    in it); a bfloat16 batch is still summed in float32."""
    grads_out, acts = capture.grads_out.to(dtype), capture.acts.to(dtype)
    out_basis, in_basis = basis.eigvecs_out, basis.eigvecs_in
    total = torch.zeros(grads_out.shape[-1], acts.shape[-1], device=grads_out.device,
                        dtype=torch.promote_types(dtype, torch.float32))
    if _through_numpy(grads_out):
        grads_out, acts, total = grads_out.numpy(), acts.numpy(), total.numpy()
        out_basis, in_basis = (None if q is None else q.numpy() for q in (out_basis, in_basis))
    if out_basis is not None:
        grads_out, acts = _rotate_tokens(grads_out, out_basis), _rotate_tokens(acts, in_basis)
    for sequence_grads, sequence_acts in zip(grads_out, acts):
        rotated = sequence_grads.T @ sequence_acts
        rotated *= rotated
        total += rotated
    return torch.as_tensor(total)


def fit_factors(model: nn.Module, task: Task, batches: Iterable, config: FactorConfig,
                modules: list[TrackedModule], *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, progress: Progress | None = None) -> Factors:
    """Fit ``config.strategy`` factors on ``batches`` (re-iterable: it may be read twice)."""
    strategy = config.kind
    low_precision = config.precision == "bfloat16"
    runner = GradientRunner(model, task, modules, device=device, dtype=dtype,
                            autocast=torch.bfloat16 if low_precision else None)
    sample = config.fisher == "true"
    eigvecs: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {m.name: (None, None) for m in modules}
    diagonals: dict[str, torch.Tensor | None] = {m.name: None for m in modules}
    info = {}

    if strategy.uses_eigenbasis:
        covariances, n_sequences, n_tokens = _covariance_pass(runner, batches, sample, config.seed, progress)
        info.update(n_sequences=n_sequences, n_tokens=n_tokens)
        for m in modules:
            covariance = covariances.pop(m.name)  # each layer's sums are freed once decomposed
            vals_in, vecs_in = eigh(covariance.acts / n_tokens)
            vals_out, vecs_out = eigh(covariance.grads / n_sequences)
            eigvecs[m.name] = (vecs_out, vecs_in)
            # eigenvalues are >= 0 in exact arithmetic; clip round-off
            diagonals[m.name] = torch.outer(vals_out.clamp_min(0), vals_in.clamp_min(0))

    if strategy.measures_diagonal:
        bases = {name: ModuleFactors(out, inp, None, 0.0) for name, (out, inp) in eigvecs.items()}
        diagonals, n_sequences = _diagonal_pass(runner, batches, bases, torch.bfloat16 if low_precision else dtype,
                                                sample, config.seed + 1, progress)
        info["n_sequences"] = n_sequences

    per_module = {
        m.name: ModuleFactors(eigvecs[m.name][0], eigvecs[m.name][1], diagonals[m.name],
                              damping_for(diagonals[m.name], config))
        for m in modules
    }
    return Factors(config, list(modules), per_module, info)


def _rotate_tokens(tokens, basis):
    """(B, T, d) @ (d, d) as one (B·T, d) product, for NumPy arrays and tensors alike."""
    return (tokens.reshape(-1, tokens.shape[-1]) @ basis).reshape(*tokens.shape[:-1], basis.shape[-1])


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, each eigenvector signed so
    that its largest entry is positive: LAPACK, cuSOLVER and their versions may return either sign,
    and kron rows project onto the eigenvectors, so an unsigned basis would make the same fit give
    other rows on another device.  On the CPU through NumPy's LAPACK, 1.5× faster than torch's at
    3072×3072 in float64 on this project's machines, where the float64 eigendecompositions of a
    GPT-2-small fit cost most of a minute per layer."""
    if matrix.device.type == "cpu":
        values, vectors = (torch.from_numpy(x) for x in np.linalg.eigh(matrix.numpy()))
    else:
        values, vectors = torch.linalg.eigh(matrix)
    largest = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    return values, vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)


def _generator(runner: GradientRunner, seed: int) -> torch.Generator:
    return torch.Generator(device=runner.device).manual_seed(seed)


def _covariance_pass(runner, batches, sample, seed, progress):
    generator = _generator(runner, seed)
    covariances = {m.name: _Covariances.zeros(m, runner.device) for m in runner.modules}
    n_sequences = n_tokens = 0
    for batch in batches:
        captures, mask = runner.train_captures(batch, sample=sample, generator=generator)
        for name, capture in captures.items():
            covariances[name].add(capture)
        size = next(iter(captures.values())).acts.shape[0]
        n_sequences += size
        n_tokens += int(mask.sum()) if mask is not None else size
        if progress:
            progress(size)
    return covariances, n_sequences, n_tokens


def _diagonal_pass(runner, batches, bases, dtype, sample, seed, progress):
    """Σ_m (Q_Sᵀ G_m Q_A)² per module, its products in ``dtype``, summed in float64 on the runner's device."""
    generator = _generator(runner, seed)
    bases = {name: basis.to(device=runner.device, dtype=dtype) for name, basis in bases.items()}
    sums = {m.name: torch.zeros(m.d_out, m.d_in, dtype=torch.float64, device=runner.device) for m in runner.modules}
    n_sequences = 0
    for batch in batches:
        captures, _ = runner.train_captures(batch, sample=sample, generator=generator)
        for name, capture in captures.items():
            sums[name] += squared_rotated_gradients(bases[name], capture, dtype)
        size = next(iter(captures.values())).acts.shape[0]
        n_sequences += size
        if progress:
            progress(size)
    return {name: total / n_sequences for name, total in sums.items()}, n_sequences
