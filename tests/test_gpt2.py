"""The core on a tiny GPT-2 built from a config: Conv1D layers, causal-LM losses, padding."""

from __future__ import annotations

import pytest
import torch

from attribdb.factors import FactorConfig
from attribdb.fitting import fit_factors
from attribdb.gradients import GradientRunner
from attribdb.influence import InfluenceComputer, pairwise_scores, token_contributions
from attribdb.tasks import CausalLMTask
from attribdb.tracking import DEFAULT_LM_PATTERNS, find_tracked_modules, per_sequence_gradients

from helpers import explicit_fisher, gpt2_reference_grads, lm_batches, tiny_gpt2, token_lists

TASK = CausalLMTask()


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def tokens():
    return token_lists(12)


def test_default_patterns_track_block_layers_only(model):
    names = [m.name for m in find_tracked_modules(model, DEFAULT_LM_PATTERNS)]
    assert names and all(".h." in n for n in names)
    assert "lm_head" not in names and not any("wte" in n or "wpe" in n for n in names)
    c_fc = next(m for m in find_tracked_modules(model, DEFAULT_LM_PATTERNS) if m.name.endswith("mlp.c_fc"))
    assert (c_fc.d_out, c_fc.d_in) == (64, 17)  # Conv1D weight is (16, 64): d_out=64, d_in=16 + bias


def test_padded_batch_gradients_equal_unpadded_autograd(model, tokens):
    modules = find_tracked_modules(model, DEFAULT_LM_PATTERNS)
    runner = GradientRunner(model, TASK, modules, dtype=torch.float64)
    batch = lm_batches(tokens, len(tokens))[0]
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    captures, _ = runner.train_captures(batch)
    for row, ids in enumerate(tokens):
        expected = gpt2_reference_grads(model, ids)
        for name, grads in expected.items():
            torch.testing.assert_close(per_sequence_gradients(captures[name])[row], grads, rtol=1e-9, atol=1e-11)


def test_query_gradient_scores_only_the_completion(model, tokens):
    modules = find_tracked_modules(model, DEFAULT_LM_PATTERNS)
    runner = GradientRunner(model, TASK, modules, dtype=torch.float64)
    ids = tokens[0]
    batch = lm_batches([ids], 1, score_from=[3])[0]
    captures, _ = runner.measurement_captures(batch)
    expected = gpt2_reference_grads(model, ids, score_from=3)
    for name, grads in expected.items():
        torch.testing.assert_close(per_sequence_gradients(captures[name])[0], grads, rtol=1e-9, atol=1e-11)


def test_padding_and_batching_do_not_change_factors(model, tokens):
    modules = find_tracked_modules(model, DEFAULT_LM_PATTERNS)
    config = FactorConfig("ekfac", fisher="empirical")
    one = fit_factors(model, TASK, lm_batches(tokens, 1), config, modules, dtype=torch.float64)
    padded = fit_factors(model, TASK, lm_batches(tokens, 5), config, modules, dtype=torch.float64)
    for name in one.per_module:
        torch.testing.assert_close(one[name].fisher_matrix(), padded[name].fisher_matrix(), rtol=1e-8, atol=1e-13)


def test_ekfac_on_gpt2_matches_explicit_fisher_diagonal(model, tokens):
    modules = find_tracked_modules(model, DEFAULT_LM_PATTERNS)[:2]
    factors = fit_factors(model, TASK, lm_batches(tokens, 4), FactorConfig("ekfac", fisher="empirical"),
                          modules, dtype=torch.float64)
    reference = [gpt2_reference_grads(model, ids) for ids in tokens]
    for m in modules:
        grads = torch.stack([r[m.name] for r in reference])
        f = factors[m.name]
        basis = torch.kron(f.eigvecs_out, f.eigvecs_in)
        expected = torch.diagonal(basis.T @ explicit_fisher(grads) @ basis)
        torch.testing.assert_close(f.diagonal.reshape(-1), expected, rtol=1e-7, atol=1e-13)


def test_true_fisher_is_seeded_on_gpt2(model, tokens):
    modules = find_tracked_modules(model, DEFAULT_LM_PATTERNS)[:1]
    fits = [fit_factors(model, TASK, lm_batches(tokens, 4), FactorConfig("ekfac", seed=seed), modules,
                        dtype=torch.float64) for seed in (1, 1, 2)]
    name = modules[0].name
    torch.testing.assert_close(fits[0][name].diagonal, fits[1][name].diagonal, rtol=0, atol=0)
    assert not torch.allclose(fits[0][name].diagonal, fits[2][name].diagonal)


def test_token_contributions_sum_to_the_sequence_score(model, tokens):
    modules = find_tracked_modules(model, DEFAULT_LM_PATTERNS)
    factors = fit_factors(model, TASK, lm_batches(tokens, 6), FactorConfig("ekfac"), modules, dtype=torch.float64)
    computer = InfluenceComputer(model, TASK, factors, dtype=torch.float64)
    query = lm_batches([tokens[0]], 1, score_from=[4])[0]
    train = lm_batches(tokens[1:6], 5)[0]
    scores = pairwise_scores(computer.query_preconditioned(query), computer.train_preconditioned(train))[0]
    rotated = computer.rotated_inverse_hvp(computer.runner.measurement_captures(query)[0])
    ihvp = {name: r[0] for name, r in rotated.items()}
    captures, mask = computer.runner.train_captures(train)
    contributions = token_contributions(computer.factors, ihvp, captures)
    assert torch.all(contributions[mask == 0] == 0), "padding must contribute nothing"
    torch.testing.assert_close(contributions.sum(1), scores, rtol=1e-9, atol=1e-12)
