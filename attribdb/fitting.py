"""Fit curvature factors over a sample of training batches.

Two passes at most, each one forward and one backward per batch:

1. *Covariances* (kfac, ekfac): ``A = Σ_tokens a aᵀ / n_tokens`` and
   ``S = Σ_m Σ_t δ δᵀ / n_sequences``, so ``S ⊗ A`` approximates the Fisher of
   a whole sequence's gradient, then an eigendecomposition of each (float64; float32 in a bfloat16 fit).
2. *Diagonal* (diagonal, ekfac): ``D = E_m[(Q_Sᵀ G_m Q_A)²]`` over per-sequence
   pseudo-gradients, the eigenvalue correction of EK-FAC.

Labels are sampled from the model for the true Fisher, with a generator seeded
from the config so a fit is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import scipy.linalg
import torch
from torch import nn

from attribdb.factors import FactorConfig, Factors, ModuleFactors, damping_for
from attribdb.gradients import GradientRunner
from attribdb.tasks import Task
from attribdb.tracking import Capture, TrackedModule

Progress = Callable[[int], None]  # called with the number of sequences just processed


class _Covariances:
    """Running sums Σ a aᵀ (d_in, d_in) and Σ δ δᵀ (d_out, d_out) of one module, on the runner's device.

    The sums are kept in the captures' dtype (float32 unless a test asks for float64), as
    kronfluence keeps its covariances: a float32 sum of a few thousand batch products loses about
    √n_batches·2⁻²⁴ of its value, far below the sampling noise of the fit.  On the CPU each batch
    is added in place by BLAS ``syrk``, which writes only one triangle: half the FLOPs of a general
    product, no temporary and no separate addition.  At GPT-2-small width that is twice as fast as
    a product followed by a float64 addition, and the covariances cost two thirds of a training step.
    """

    def __init__(self, module: TrackedModule, device: torch.device, dtype: torch.dtype):
        self.acts = torch.zeros(module.d_in, module.d_in, dtype=dtype, device=device)
        self.grads = torch.zeros(module.d_out, module.d_out, dtype=dtype, device=device)

    def add(self, capture: Capture) -> None:
        _add_gram(self.acts, capture.acts.flatten(0, 1))
        _add_gram(self.grads, capture.grads_out.flatten(0, 1))

    def averages(self, n_tokens: int, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, S): the activations' covariance per token, the gradients' per sequence.  Only their
        lower triangles are meant (the upper ones are stale on the CPU), which is all ``eigh`` reads."""
        return self.acts / n_tokens, self.grads / n_sequences


def _add_gram(total: torch.Tensor, rows: torch.Tensor) -> None:
    """``total += rowsᵀ rows`` in place; on the CPU only ``total``'s lower triangle is written."""
    if not _through_numpy(rows):
        total.addmm_(rows.T, rows)
        return
    array = rows.detach().contiguous().numpy()
    # total.numpy().T is total seen in column-major order, as BLAS wants it; its upper triangle
    # is total's lower one.  array.T (d, N) is column-major too, so nothing is copied.
    syrk = scipy.linalg.blas.get_blas_funcs("syrk", (array,))
    column_major = total.numpy().T
    result = syrk(1.0, array.T, beta=1.0, c=column_major, trans=0, lower=0, overwrite_c=1)
    if not np.shares_memory(result, column_major):  # f2py copies when it cannot write in place
        column_major[...] = result


def _through_numpy(tensor: torch.Tensor) -> bool:
    """Whether a product of ``tensor`` runs through NumPy's or SciPy's BLAS (OpenBLAS): on this
    project's (AMD) machines torch's CPU GEMM in float32 runs at about half of OpenBLAS's speed.
    Other devices and dtypes keep torch."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)


def squared_rotated_gradients(basis: ModuleFactors, capture: Capture) -> torch.Tensor:
    """``Σ_m (Q_Sᵀ G_m Q_A)²`` over a batch's sequences (d_out, d_in): the eigenvalue correction's sum.

    Each token's δ and a are rotated into the eigenbases (cheaper than rotating G when T < d), and
    each sequence's ``Σ_t (Q_Sᵀ δ_t)(Q_Aᵀ a_t)ᵀ`` is squared and added in place, so the batch's
    (B, d_out, d_in) gradients are never held.  The products run in the captures' dtype (the basis
    is already in it); a bfloat16 batch is still summed in float32."""
    grads_out, acts = capture.grads_out, capture.acts
    out_basis, in_basis = basis.eigvecs_out, basis.eigvecs_in
    total = torch.zeros(grads_out.shape[-1], acts.shape[-1], device=grads_out.device,
                        dtype=torch.promote_types(acts.dtype, torch.float32))
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

    def runner(capture_dtype: torch.dtype) -> GradientRunner:
        return GradientRunner(model, task, modules, device=device, dtype=capture_dtype,
                              autocast=torch.bfloat16 if low_precision else None)

    sample = config.fisher == "true"
    eigvecs: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {m.name: (None, None) for m in modules}
    diagonals: dict[str, torch.Tensor | None] = {m.name: None for m in modules}
    info = {}

    if strategy.uses_eigenbasis:
        covariances, n_sequences, n_tokens = _covariance_pass(runner(dtype), batches, sample, config.seed, progress)
        info.update(n_sequences=n_sequences, n_tokens=n_tokens)
        # a low-precision fit decomposes in float32: twice as fast, and its error is far below bfloat16's
        decomposition_dtype = torch.float32 if low_precision else torch.float64
        for m in modules:
            # each layer's sums are freed once decomposed
            acts, grads = covariances.pop(m.name).averages(n_tokens, n_sequences)
            vals_in, vecs_in = eigh(acts, decomposition_dtype)
            vals_out, vecs_out = eigh(grads, decomposition_dtype)
            eigvecs[m.name] = (vecs_out, vecs_in)
            # eigenvalues are >= 0 in exact arithmetic; clip round-off
            diagonals[m.name] = torch.outer(vals_out.clamp_min(0), vals_in.clamp_min(0))

    if strategy.measures_diagonal:
        bases = {name: ModuleFactors(out, inp, None, 0.0) for name, (out, inp) in eigvecs.items()}
        # a low-precision correction captures in bfloat16 what its bfloat16 products would round to anyway
        diagonals, n_sequences = _diagonal_pass(runner(torch.bfloat16 if low_precision else dtype), batches, bases,
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


def eigh(matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric matrix whose lower triangle is
    ``matrix``'s (the upper one is not read), computed in ``dtype`` and returned in float64, each
    eigenvector signed so that its largest entry is positive: LAPACK, cuSOLVER and their versions
    may return either sign, and kron rows project onto the eigenvectors, so an unsigned basis would
    make the same fit give other rows on another device.  On the CPU through SciPy's LAPACK
    divide-and-conquer driver (``syevd``): at 3073×3073 it takes 5.4 s in float64 and 2.6 s in
    float32 on this project's machines, against 8.9 and 4.3 s through torch, where a GPT-2-small
    fit decomposes 36 matrices of that size."""
    matrix = matrix.to(dtype)
    if matrix.device.type == "cpu":
        values, vectors = scipy.linalg.eigh(matrix.numpy(), lower=True, driver="evd", check_finite=False)
        values, vectors = torch.from_numpy(values), torch.from_numpy(vectors)
    else:
        values, vectors = torch.linalg.eigh(matrix, UPLO="L")
    values, vectors = values.to(torch.float64), vectors.to(torch.float64)  # factors are float64 whatever the dtype
    largest = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    return values, vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)


def _generator(runner: GradientRunner, seed: int) -> torch.Generator:
    return torch.Generator(device=runner.device).manual_seed(seed)


def _covariance_pass(runner, batches, sample, seed, progress):
    generator = _generator(runner, seed)
    covariances = {m.name: _Covariances(m, runner.device, runner.dtype) for m in runner.modules}
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


def _diagonal_pass(runner, batches, bases, sample, seed, progress):
    """Σ_m (Q_Sᵀ G_m Q_A)² per module, its products in the runner's capture dtype, summed in float64
    on the runner's device."""
    generator = _generator(runner, seed)
    bases = {name: basis.to(device=runner.device, dtype=runner.dtype) for name, basis in bases.items()}
    sums = {m.name: torch.zeros(m.d_out, m.d_in, dtype=torch.float64, device=runner.device) for m in runner.modules}
    n_sequences = 0
    for batch in batches:
        captures, _ = runner.train_captures(batch, sample=sample, generator=generator)
        for name, capture in captures.items():
            sums[name] += squared_rotated_gradients(bases[name], capture)
        size = next(iter(captures.values())).acts.shape[0]
        n_sequences += size
        if progress:
            progress(size)
    return {name: total / n_sequences for name, total in sums.items()}, n_sequences
