"""What a row is (attribdb/rows.py), checked against dense computations on a tiny GPT-2 in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribdb.errors import ConfigError
from attribdb.factors import FactorConfig
from attribdb.fitting import fit_factors
from attribdb.influence import InfluenceComputer, pairwise_scores
from attribdb.rows import QUERY_RANK, RowProjection, _low_rank, module_scores, plan_rows, to_stored
from attribdb.tasks import CausalLMTask
from attribdb.tracking import DEFAULT_LM_PATTERNS, find_tracked_modules

from helpers import lm_batches, tiny_gpt2, token_lists

TASK = CausalLMTask()


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2()
    tokens = token_lists(24)
    modules = find_tracked_modules(model, DEFAULT_LM_PATTERNS)
    factors = fit_factors(model, TASK, lm_batches(tokens, 6), FactorConfig("ekfac"), modules, dtype=torch.float64)
    computer = InfluenceComputer(model, TASK, factors, dtype=torch.float64)
    return model, tokens, factors, computer


def _dense_bytes(factors) -> int:
    return 2 * sum(m.d_out * m.d_in for m in factors.modules) + 4


def _weights(factors, name):
    f = factors[name]
    return f.diagonal / (f.diagonal + f.damping)


def test_plan_spends_the_budget_on_the_expected_influence(setup):
    _, _, factors, _ = setup
    previous = 0.0
    for row_bytes in (256, 1024, 4096, _dense_bytes(factors)):
        plan = plan_rows(factors, row_bytes)
        assert plan.layout.bytes_per_row <= row_bytes
        kept_total, grand_total = 0.0, 0.0
        for module, kept in zip(plan.layout.modules, plan.layout.expected_kept):
            weights = _weights(factors, module.name)
            block = weights[plan.out_index[module.name]][:, plan.in_index[module.name]]
            assert block.shape == (len(plan.out_index[module.name]), len(plan.in_index[module.name]))
            assert kept == pytest.approx(float(block.sum() / weights.sum()), rel=1e-5)
            kept_total += float(block.sum())
            grand_total += float(weights.sum())
        assert kept_total / grand_total >= previous - 1e-9  # more bytes never keep less
        previous = kept_total / grand_total
    assert previous == pytest.approx(1.0)  # the dense budget keeps everything


def test_the_kept_block_beats_the_eigenvalue_order_at_equal_size(setup):
    """Choosing rows and columns by Λ/(Λ+λ) keeps at least the share of a same-shaped block chosen
    by the raw eigenvalue order of each side (LoGra's PCA choice)."""
    _, _, factors, _ = setup
    plan = plan_rows(factors, 2048)
    for module, (k_out, k_in) in zip(plan.layout.modules, plan.layout.blocks):
        weights = _weights(factors, module.name)
        f = factors[module.name]
        by_eigenvalue = weights[f.diagonal.sum(1).argsort(descending=True)[:k_out]][
            :, f.diagonal.sum(0).argsort(descending=True)[:k_in]]
        ours = weights[plan.out_index[module.name]][:, plan.in_index[module.name]]
        assert float(ours.sum()) >= float(by_eigenvalue.sum()) - 1e-9, module.name


def test_encoded_rows_are_blocks_of_the_dense_preconditioned_gradient(setup):
    _, tokens, factors, computer = setup
    plan = plan_rows(factors, 1024)
    projection = RowProjection.from_plan(factors, plan).to(dtype=torch.float64)
    batch = lm_batches(tokens[:5], 5)[0]
    captures, _ = computer.runner.train_captures(batch)
    rows = projection.encode(captures)
    dense = computer.precondition(captures)
    for module in plan.layout.modules:
        expected = dense[module.name][:, plan.out_index[module.name]][:, :, plan.in_index[module.name]].flatten(1)
        torch.testing.assert_close(rows[:, plan.layout.slices[module.name]], expected, rtol=1e-10, atol=1e-12)


def test_with_every_coordinate_kept_stored_scores_equal_full_scores(setup):
    """At the dense budget a row is Ĝ reordered: its inner products are the EK-FAC scores, up to
    float16 storage of the unit rows."""
    _, tokens, factors, computer = setup
    plan = plan_rows(factors, _dense_bytes(factors))
    assert plan.layout.dim == sum(m.d_out * m.d_in for m in factors.modules)
    projection = RowProjection.from_plan(factors, plan).to(dtype=torch.float64)
    query_batch = lm_batches(tokens[:3], 3, score_from=[2, 2, 2])[0]
    train_batch = lm_batches(tokens[3:15], 12)[0]
    full = pairwise_scores(computer.query_preconditioned(query_batch), computer.train_preconditioned(train_batch))
    query_rows = projection.encode(computer.runner.measurement_captures(query_batch)[0])
    unit, squared = to_stored(projection.encode(computer.runner.train_captures(train_batch)[0]))
    stored = module_scores(plan.layout, query_rows, torch.from_numpy(unit.astype(np.float64)),
                           torch.from_numpy(squared.astype(np.float64))).sum(-1)
    scale = full.abs().max()
    torch.testing.assert_close(stored, full, rtol=0, atol=2e-3 * float(scale))


def test_unit_rows_and_norms_round_trip_and_zero_rows_stay_zero():
    rows = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1e-20, 0.0, 0.0]])
    unit, squared = to_stored(rows)
    assert unit.dtype == np.float16 and squared.dtype == np.float32
    np.testing.assert_allclose(unit[0], [0.6, 0.8, 0.0], atol=1e-3)
    assert squared[0] == pytest.approx(25.0) and not unit[1].any() and squared[1] == 0
    assert np.isfinite(unit).all()


def test_a_budget_too_small_for_the_modules_is_refused(setup):
    _, _, factors, _ = setup
    with pytest.raises(ConfigError, match="row-bytes"):
        plan_rows(factors, 2 * len(factors.modules) - 1)


@pytest.mark.parametrize("query_rank", [QUERY_RANK, 10**6], ids=["default-rank", "full-rank"])
def test_kron_rows_estimate_the_full_score_without_bias(setup, query_rank):
    """Averaged over projection seeds, ⟨query row, training row⟩ converges to the EK-FAC score:
    the mean's error stays within a few standard errors of the seeds' own spread.  At full rank the
    query side applies (Λ + λ)⁻¹ exactly; at the default rank its approximation's error is below
    what 48 seeds can see."""
    _, tokens, factors, computer = setup
    query_batch = lm_batches(tokens[:2], 2, score_from=[2, 2])[0]
    train_batch = lm_batches(tokens[2:10], 8)[0]
    full = pairwise_scores(computer.query_preconditioned(query_batch), computer.train_preconditioned(train_batch))
    query_captures = computer.runner.measurement_captures(query_batch)[0]
    train_captures = computer.runner.train_captures(train_batch)[0]

    estimates = []
    for seed in range(48):
        projection = RowProjection.fit(factors, 600, "kron", seed=seed, query_rank=query_rank).to(dtype=torch.float64)
        assert projection.layout.kind == "kron" and projection.layout.bytes_per_row <= 600
        query_rows = projection.encode_query(query_captures)
        estimates.append(query_rows @ projection.encode(train_captures).T)
    estimates = torch.stack(estimates)
    mean, standard_error = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert torch.all((mean - full).abs() <= 4 * standard_error + 1e-9 * full.abs().max())
    single_error = (estimates - full).pow(2).mean().sqrt()  # one projection's error
    assert (mean - full).pow(2).mean().sqrt() < 0.3 * single_error  # averaging converges: ~1/√48 of it


def test_low_rank_inverse_curvature_is_the_truncated_svd():
    """The kron query side's rank-r (Λ + λ)⁻¹ is as close as the best rank-r approximation
    (Eckart-Young: a full SVD truncated) to within 1%, and exact at full rank."""
    matrix = 1.0 / (torch.rand(60, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3 + 0.1)
    left, values, right = torch.linalg.svd(matrix, full_matrices=False)
    for rank in (1, 5, 12, 40):
        found_left, found_right = _low_rank(matrix, rank, torch.Generator().manual_seed(1))
        best = (left[:, :rank] * values[:rank]) @ right[:rank]
        found = found_left @ found_right.T
        assert found_left.shape == (60, rank) and found_right.shape == (40, rank)
        assert torch.linalg.norm(matrix - found) <= 1.01 * torch.linalg.norm(matrix - best) + 1e-9 * float(values[0])
    torch.testing.assert_close(found, matrix, rtol=0, atol=1e-9 * float(values[0]))


def test_kron_projections_round_trip_through_their_file(setup, tmp_path):
    _, _, factors, _ = setup
    projection = RowProjection.fit(factors, 1024, "kron", seed=3)
    projection.save(tmp_path / "rows.safetensors")
    loaded = RowProjection.load(tmp_path / "rows.safetensors", projection.layout)
    for name, block in projection.maps.items():
        for key in ("out", "inp", "query_out", "query_inp"):
            torch.testing.assert_close(getattr(loaded.maps[name], key), getattr(block, key).float())
