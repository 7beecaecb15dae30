"""What a row is (attribdb/rows.py), checked against dense computations on a tiny GPT-2 in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribdb.errors import ConfigError, StoreError
from attribdb.factors import FactorConfig
from attribdb.fitting import fit_factors
from attribdb.influence import InfluenceComputer, pairwise_scores, self_influence
from attribdb.rows import (
    RowLayout,
    RowProjection,
    allocate,
    check_payloads,
    index_vectors,
    module_scores,
    pack,
    unpack,
)
from attribdb.tasks import CausalLMTask
from attribdb.tracking import DEFAULT_LM_PATTERNS, TrackedModule, find_tracked_modules

from helpers import lm_batches, tiny_gpt2, token_lists

TASK = CausalLMTask()


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2()
    tokens = token_lists(24)
    modules = find_tracked_modules(model, DEFAULT_LM_PATTERNS)
    factors = fit_factors(model, TASK, lm_batches(tokens, 6), FactorConfig("ekfac"), modules, dtype=torch.float64)
    computer = InfluenceComputer(model, TASK, factors, dtype=torch.float64)
    sample = [computer.runner.train_captures(batch)[0] for batch in lm_batches(tokens[:12], 6)]
    return tokens, factors, computer, sample


def _dense_bytes(factors) -> int:
    return 4 * sum(m.d_out * m.d_in for m in factors.modules)


def _scores(projection, computer, tokens):
    """(stored-row scores, exact scores, stored self-influence, exact self-influence) of every
    sequence of ``tokens`` as a row against every one of them as a query."""
    batch = lm_batches(tokens, len(tokens))[0]
    train = computer.runner.train_captures(batch)[0]
    rows = projection.encode(train)
    queries = projection.queries(computer.runner.measurement_captures(batch)[0])
    stored = module_scores(projection.layout, queries, rows.payloads).sum(-1)
    exact_query = computer.query_preconditioned(batch)
    exact_train = computer.precondition(train)
    return stored, pairwise_scores(exact_query, exact_train), rows.self_influence, self_influence(exact_train)


def test_whole_space_rows_with_room_for_every_component_give_the_exact_scores(setup):
    tokens, factors, computer, sample = setup
    projection = RowProjection.fit(factors, 4 * _dense_bytes(factors), sample)
    assert projection.layout.whole_space
    stored, exact, stored_self, exact_self = _scores(projection.to(dtype=torch.float64), computer, tokens[:8])
    # 4-bit factors: every score within a few percent of the largest, the ranking kept
    assert torch.allclose(stored, exact, atol=0.03 * float(exact.abs().max()))
    assert np.allclose(stored_self, exact_self.numpy(), rtol=1e-4)  # the self-influence is stored exactly
    for q in range(len(exact)):
        assert int(stored[q].argmax()) == int(exact[q].argmax())


def test_more_bytes_never_make_the_scores_worse(setup):
    tokens, factors, computer, sample = setup
    errors = []
    for payload_bytes in (548, 1148, 2948, 4 * _dense_bytes(factors)):
        projection = RowProjection.fit(factors, payload_bytes, sample).to(dtype=torch.float64)
        stored, exact, _, _ = _scores(projection, computer, tokens[:12])
        errors.append(float((stored - exact).norm() / exact.norm()))
    assert errors == sorted(errors, reverse=True)
    assert errors[0] > 2 * errors[-1]


def test_allocation_takes_the_largest_components_per_byte_first():
    values = [torch.tensor([[4.0, 1.0, 0.5]]), torch.tensor([[3.0, 2.9, 0.1]])]
    costs = [10, 20]
    ranks = allocate(values, costs, budget=45)
    # σ²/cost: 1.6, 0.1, 0.025 against 0.45, 0.42, 0.0005: 1.6 (35 bytes left), 0.45 (15 left);
    # 0.42 costs 20 and no longer fits, so the next that does is 0.1 (5 left)
    assert ranks.tolist() == [[2, 1]]
    assert allocate(values, costs, budget=60).tolist() == [[2, 2]]
    assert allocate(values, costs, budget=9).tolist() == [[0, 0]]  # nothing fits


def _layout(subspaces, payload_bytes):
    modules = tuple(TrackedModule(f"m{i}", d_in, d_out, False) for i, (d_out, d_in) in enumerate(subspaces))
    return RowLayout(modules, tuple(subspaces), payload_bytes, tuple(4 for _ in subspaces))


def test_payloads_round_trip_within_the_4_bit_rounding():
    layout = _layout([(5, 3), (2, 7)], 200)
    generator = torch.Generator().manual_seed(0)
    ranks = np.array([[2, 1], [0, 2], [3, 0]])
    left = [torch.randn(3, 3, 5, generator=generator), torch.randn(3, 2, 2, generator=generator)]
    right = [torch.randn(3, 3, 3, generator=generator), torch.randn(3, 2, 7, generator=generator)]
    payloads = pack(layout, ranks, left, right)
    assert payloads.shape == (3, 200) and payloads.dtype == np.uint8
    check_payloads(layout, payloads)
    for m, components in enumerate(unpack(layout, payloads)):
        expected_rows = np.repeat(np.arange(3), ranks[:, m])
        assert components.rows.tolist() == expected_rows.tolist()
        within = np.concatenate([np.arange(r) for r in ranks[:, m]])
        for stored, given in ((components.left, left[m]), (components.right, right[m])):
            original = given[torch.as_tensor(expected_rows), torch.as_tensor(within)].numpy()
            step = np.abs(original).max(axis=1, keepdims=True) / 7
            assert np.all(np.abs(stored - original) <= step / 2 + 1e-6)


def test_a_damaged_header_is_refused():
    layout = _layout([(5, 3)], 60)
    payloads = np.zeros((1, 60), dtype=np.uint8)
    payloads[0, 0] = 200  # more components than 60 bytes (or a 5×3 block) can hold
    with pytest.raises(StoreError, match="damaged"):
        check_payloads(layout, payloads)


def test_sketch_inner_products_estimate_the_stored_scores_without_bias(setup):
    tokens, factors, computer, sample = setup
    batch = lm_batches(tokens[:8], 8)[0]
    train = computer.runner.train_captures(batch)[0]
    query_captures = computer.runner.measurement_captures(batch)[0]
    estimates = []
    for seed in range(40):
        projection = RowProjection.fit(factors, 5948, sample, seed=seed).to(dtype=torch.float64)
        rows = projection.encode(train)
        queries = projection.queries(query_captures)
        stored = module_scores(projection.layout, queries, rows.payloads).sum(-1)
        sketches = torch.from_numpy(projection.sketches(rows.payloads)).double()
        estimates.append(projection.query_sketches(queries) @ sketches.T)
    mean = torch.stack(estimates).mean(0)
    spread = torch.stack(estimates).std(0) / len(estimates) ** 0.5
    assert torch.all((mean - stored).abs() <= 4 * spread + 1e-6 * stored.abs().max())


def test_index_vectors_are_sketches_over_the_root_self_influence_padded():
    sketches = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    vectors = index_vectors(sketches, np.array([25.0, 0.0]), normalized=True)
    assert vectors.shape == (2, 16)
    assert np.allclose(vectors[0, :3], [0.6, 0.8, 0.0]) and np.allclose(vectors[1, :3], [1.0, 0.0, 0.0])
    assert np.allclose(index_vectors(sketches, np.array([25.0, 0.0]), normalized=False)[:, :3], sketches)


def test_a_budget_too_small_for_the_modules_is_refused(setup):
    _, factors, _, _ = setup
    with pytest.raises(ConfigError, match="cannot hold one component"):
        RowProjection.fit(factors, len(factors.modules) + 9, [])


def test_projections_round_trip_through_their_file(setup, tmp_path):
    tokens, factors, computer, sample = setup
    projection = RowProjection.fit(factors, 5948, sample)
    projection.save(tmp_path / "rows.safetensors")
    loaded = RowProjection.load(tmp_path / "rows.safetensors", projection.layout)
    batch = lm_batches(tokens[:4], 4)[0]
    captures = computer.runner.train_captures(batch)[0]
    first, second = projection.to(dtype=torch.float32).encode(captures), loaded.encode(captures)
    assert np.array_equal(first.payloads, second.payloads)
    other = RowLayout(projection.layout.modules, tuple((1, 1) for _ in projection.layout.modules),
                      projection.layout.payload_bytes, projection.layout.sketch_widths)
    with pytest.raises(StoreError, match="does not match"):
        RowProjection.load(tmp_path / "rows.safetensors", other)
