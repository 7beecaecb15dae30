"""EK-FAC core against independent computations on tiny float64 models."""

from __future__ import annotations

import copy

import pytest
import torch

from attribdb.factors import FactorConfig, Factors
from attribdb.fitting import _add_gram, eigh, fit_factors
from attribdb.gradients import GradientRunner
from attribdb.influence import InfluenceComputer, pairwise_scores, self_influence
from attribdb.tasks import RegressionTask
from attribdb.tracking import find_tracked_modules, per_sequence_gradients

from helpers import CLASSIFICATION, batches_of, classification_data, explicit_fisher, per_example_linear_grads, tiny_mlp

N = 64


@pytest.fixture(scope="module")
def mlp():
    return tiny_mlp()


@pytest.fixture(scope="module")
def data():
    return classification_data(N)


@pytest.fixture(scope="module")
def reference(mlp, data):
    return per_example_linear_grads(mlp, *data)


def fit(mlp, data, strategy, fisher="empirical", batch=16, **kwargs):
    modules = find_tracked_modules(mlp)
    config = FactorConfig(strategy=strategy, fisher=fisher, **kwargs)
    return fit_factors(mlp, CLASSIFICATION, batches_of(*data, batch), config, modules, dtype=torch.float64)


def test_per_sequence_gradients_equal_torch_func(mlp, data, reference):
    runner = GradientRunner(mlp, CLASSIFICATION, find_tracked_modules(mlp), dtype=torch.float64)
    captures, _ = runner.train_captures(data)
    for name, expected in reference.items():
        torch.testing.assert_close(per_sequence_gradients(captures[name]), expected, rtol=1e-10, atol=1e-12)


def test_kfac_factors_equal_their_definition(mlp, data, reference):
    factors = fit(mlp, data, "kfac")
    inputs, targets = data
    # independent forward: layer inputs and pre-activation gradients by hand
    first, second = mlp[0], mlp[2]
    pre1 = (inputs @ first.weight.T + first.bias).detach().requires_grad_(True)
    hidden = torch.tanh(pre1)
    pre2 = (hidden @ second.weight.T + second.bias)
    loss = torch.nn.functional.cross_entropy(pre2, targets, reduction="sum")
    deltas = torch.autograd.grad(loss, [pre1, pre2])
    ones = torch.ones(N, 1, dtype=torch.float64)
    for name, a, delta in (("0", torch.cat([inputs, ones], 1), deltas[0]),
                           ("2", torch.cat([hidden.detach(), ones], 1), deltas[1])):
        expected = torch.kron(delta.T @ delta / N, a.T @ a / N)
        torch.testing.assert_close(factors[name].fisher_matrix(), expected, rtol=1e-9, atol=1e-12)


def test_eigenvectors_are_signed_by_their_largest_entry(mlp, data):
    """Kron rows project onto the eigenvectors, so the fit fixes each one's sign (LAPACK and
    cuSOLVER may return either): a matrix built from a basis with some columns negated gives back
    the fitted, canonically signed basis."""
    factors = fit(mlp, data, "kfac")
    for name in factors.per_module:
        for vectors in (factors[name].eigvecs_out, factors[name].eigvecs_in):
            largest = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
            assert (largest > 0).all()
            n = vectors.shape[1]
            negated = vectors * torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0).to(vectors.dtype)
            spectrum = torch.arange(1, n + 1, dtype=vectors.dtype)
            _, again = eigh(negated @ torch.diag(spectrum) @ negated.T)
            torch.testing.assert_close(again, vectors, rtol=0, atol=1e-8)


def test_ekfac_correction_is_diagonal_of_explicit_fisher_in_eigenbasis(mlp, data, reference):
    factors = fit(mlp, data, "ekfac")
    for name, grads in reference.items():
        f = factors[name]
        basis = torch.kron(f.eigvecs_out, f.eigvecs_in)
        expected = torch.diagonal(basis.T @ explicit_fisher(grads) @ basis)
        torch.testing.assert_close(f.diagonal.reshape(-1), expected, rtol=1e-9, atol=1e-14)


def test_ekfac_is_never_farther_from_fisher_than_kfac(mlp, data, reference):
    ekfac, kfac = fit(mlp, data, "ekfac"), fit(mlp, data, "kfac")
    for name, grads in reference.items():
        fisher = explicit_fisher(grads)
        distance_ekfac = torch.linalg.matrix_norm(ekfac[name].fisher_matrix() - fisher)
        distance_kfac = torch.linalg.matrix_norm(kfac[name].fisher_matrix() - fisher)
        assert distance_ekfac <= distance_kfac + 1e-12, (name, distance_ekfac, distance_kfac)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_inverse_hvp_and_scores_equal_explicit_solve(mlp, data, reference, strategy):
    factors = fit(mlp, data, strategy, damping_factor=0.05)
    computer = InfluenceComputer(mlp, CLASSIFICATION, factors, dtype=torch.float64)
    queries = (data[0][:3], data[1][:3])
    train = (data[0][10:20], data[1][10:20])
    scores = pairwise_scores(computer.query_preconditioned(queries), computer.train_preconditioned(train))
    expected = torch.zeros(3, 10, dtype=torch.float64)
    ihvp = computer.inverse_hvp(computer.query_preconditioned(queries))
    for name, grads in reference.items():
        f = factors[name]
        damped = f.fisher_matrix() + f.damping * torch.eye(f.diagonal.numel(), dtype=torch.float64)
        q = grads[:3].reshape(3, -1)
        solved = torch.linalg.solve(damped, q.T).T
        torch.testing.assert_close(ihvp[name].reshape(3, -1), solved, rtol=1e-8, atol=1e-10)
        expected += solved @ grads[10:20].reshape(10, -1).T
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10)


def test_identity_is_plain_gradient_dot_product(mlp, data, reference):
    factors = fit(mlp, data, "identity")
    computer = InfluenceComputer(mlp, CLASSIFICATION, factors, dtype=torch.float64)
    pre = computer.train_preconditioned(data)
    flat = torch.cat([g.reshape(N, -1) for g in reference.values()], dim=1)
    torch.testing.assert_close(pairwise_scores(pre, pre), flat @ flat.T, rtol=1e-10, atol=1e-12)


def test_self_influence_is_diagonal_of_pairwise_scores(mlp, data):
    computer = InfluenceComputer(mlp, CLASSIFICATION, fit(mlp, data, "ekfac"), dtype=torch.float64)
    pre = computer.train_preconditioned(data)
    torch.testing.assert_close(self_influence(pre), torch.diagonal(pairwise_scores(pre, pre)))


def test_exhaustive_scores_do_not_depend_on_batching(mlp, data):
    computer = InfluenceComputer(mlp, CLASSIFICATION, fit(mlp, data, "ekfac"), dtype=torch.float64)
    queries = (data[0][:5], data[1][:5])
    one = computer.exhaustive_scores([queries], [data])
    many = computer.exhaustive_scores(batches_of(*queries, 2), batches_of(*data, 7))
    torch.testing.assert_close(one.scores, many.scores)
    torch.testing.assert_close(one.train_self_influence, many.train_self_influence)


def test_factors_do_not_depend_on_fitting_batch_size(mlp, data):
    small, large = fit(mlp, data, "ekfac", batch=5), fit(mlp, data, "ekfac", batch=64)
    for name in small.per_module:
        torch.testing.assert_close(small[name].fisher_matrix(), large[name].fisher_matrix())


def test_true_fisher_samples_labels_reproducibly():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    inputs = torch.randn(4000, 3, dtype=torch.float64)
    batches = [(inputs[i:i + 500], torch.zeros(500, 1, dtype=torch.float64)) for i in range(0, 4000, 500)]
    modules = find_tracked_modules(model)
    task = RegressionTask()
    true1 = fit_factors(model, task, batches, FactorConfig("kfac", seed=5), modules, dtype=torch.float64)
    true2 = fit_factors(model, task, batches, FactorConfig("kfac", seed=5), modules, dtype=torch.float64)
    empirical = fit_factors(model, task, batches, FactorConfig("kfac", fisher="empirical"), modules,
                            dtype=torch.float64)
    torch.testing.assert_close(true1["2"].fisher_matrix(), true2["2"].fisher_matrix())
    # y ~ N(f(x), 1) makes δ = f - y standard normal at the output, so the 1×1 factor
    # S = E[δ²] ≈ 1 whatever the (all-zero, badly fitted) targets say; F = S ⊗ A
    with torch.no_grad():
        hidden = torch.cat([torch.tanh(model[0](inputs)), torch.ones(4000, 1, dtype=torch.float64)], 1)
    acts_cov = hidden.T @ hidden / 4000
    s_true = torch.trace(true1["2"].fisher_matrix()) / torch.trace(acts_cov)
    assert abs(float(s_true) - 1.0) < 0.1
    assert not torch.allclose(true1["2"].diagonal, empirical["2"].diagonal)


def test_factors_round_trip_through_safetensors(mlp, data, tmp_path):
    factors = fit(mlp, data, "ekfac")
    factors.save(tmp_path / "f.safetensors")
    loaded = Factors.load(tmp_path / "f.safetensors")
    assert loaded.config == factors.config and loaded.modules == factors.modules
    for name, f in factors.per_module.items():
        for key in ("eigvecs_out", "eigvecs_in", "diagonal"):
            torch.testing.assert_close(getattr(loaded[name], key), getattr(f, key), rtol=0, atol=0)
        assert loaded[name].damping == f.damping


def test_default_damping_is_a_tenth_of_mean_eigenvalue(mlp, data):
    factors = fit(mlp, data, "ekfac")
    for f in factors.per_module.values():
        assert f.damping == pytest.approx(0.1 * float(f.diagonal.mean()))
    assert fit(mlp, data, "ekfac", damping=0.3)["0"].damping == 0.3


def test_float32_batches_accumulate_into_float64_factors(mlp, data):
    """Per-batch products and the covariances' running sums are in the compute dtype; the factors
    are float64 and agree with a float64 fit."""
    model32 = copy.deepcopy(mlp).float()
    inputs, targets = data
    config = FactorConfig(strategy="ekfac", fisher="empirical")
    single = fit_factors(model32, CLASSIFICATION, batches_of(inputs.float(), targets, 16), config,
                         find_tracked_modules(model32), dtype=torch.float32)
    double = fit(mlp, data, "ekfac")
    for name, f in single.per_module.items():
        assert f.eigvecs_in.dtype == f.diagonal.dtype == torch.float64
        torch.testing.assert_close(f.fisher_matrix(), double[name].fisher_matrix(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_covariance_sums_equal_the_products_they_add(dtype):
    """In place through BLAS syrk (float32/64 on the CPU, one triangle written) or torch's addmm
    (every other dtype and device): the running sum of two batches is Σ rowsᵀ rows in its lower
    triangle, the one eigh reads."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(50, 7, generator=generator, dtype=torch.float64) for _ in range(2)]
    total = torch.zeros(7, 7, dtype=dtype)
    for rows in batches:
        _add_gram(total, rows.to(dtype))
    expected = sum(rows.to(dtype).double().T @ rows.to(dtype).double() for rows in batches)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(total.double().tril(), expected.tril(), rtol=tolerance, atol=tolerance * 100)


def test_factors_load_in_the_compute_dtype_and_the_computer_keeps_them(mlp, data, tmp_path):
    fit(mlp, data, "ekfac").save(tmp_path / "f.safetensors")
    loaded = Factors.load(tmp_path / "f.safetensors", dtype=torch.float32)
    assert all(getattr(f, key).dtype == torch.float32
               for f in loaded.per_module.values() for key in ("eigvecs_out", "eigvecs_in", "diagonal"))
    computer = InfluenceComputer(copy.deepcopy(mlp).float(), CLASSIFICATION, loaded, dtype=torch.float32)
    for name, f in loaded.per_module.items():  # the same memory: no second copy
        assert computer.factors[name].eigvecs_in.data_ptr() == f.eigvecs_in.data_ptr()


def test_bfloat16_fit_stays_close_to_the_float32_fit(mlp, data):
    """The low-precision fit (bfloat16 autocast, bfloat16 correction) changes the factors by about
    bfloat16's rounding, not more; and it does run in bfloat16 (the factors are not the float32 ones)."""
    model32 = copy.deepcopy(mlp).float()
    inputs, targets = data
    fits = {precision: fit_factors(model32, CLASSIFICATION, batches_of(inputs.float(), targets, 16),
                                   FactorConfig(strategy="ekfac", fisher="empirical", precision=precision),
                                   find_tracked_modules(model32), dtype=torch.float32)
            for precision in ("float32", "bfloat16")}
    for name, f in fits["float32"].per_module.items():
        low = fits["bfloat16"][name]
        assert low.diagonal.dtype == torch.float64
        reference = f.fisher_matrix()
        error = torch.linalg.matrix_norm(low.fisher_matrix() - reference) / torch.linalg.matrix_norm(reference)
        assert 1e-5 < error < 0.03, (name, float(error))
