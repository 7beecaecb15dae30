"""Build, query and verify on tiny configs of the architectures people use; MoE experts refused by name."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from attribdb import api
from attribdb.cli import main
from attribdb.gradients import GradientRunner
from attribdb.tasks import CausalLMTask
from attribdb.tracking import find_tracked_modules, per_sequence_gradients

from architectures import make_architecture_folder
from conftest import write_corpus
from dbtools import rewrite_manifest
from helpers import lm_batches, token_lists

SETTINGS = dict(max_length=16, shard_size=16, commit_rows=8, batch_size=4, fit_sample_size=16, row_bytes=2048)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("arch") / "corpus.jsonl", 24)


def _info_text(db) -> str:
    result = CliRunner().invoke(main, ["info", str(db)])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name == "llama" else pytest.mark.slow)
                                  for name in ("gpt2", "pythia", "llama", "qwen2", "phi", "opt")])  # llama: quick
def test_build_query_verify(tmp_path, small_corpus, name):
    folder = make_architecture_folder(tmp_path / name, name)
    api.build(tmp_path / "db", str(small_corpus), str(folder), quiet=True, **SETTINGS)
    with api.open(tmp_path / "db") as db:
        assert db.verify().rows == db.info()["sequences"] > 16  # more than one shard
        result = db.query("the cat sat", " over the river", k=3)
        assert len(result.hits) == 3 and all(torch.isfinite(torch.tensor(h.score)) for h in result.hits)
        coverage = db.info()["block_coverage"]
    # every weight matrix of the blocks is tracked; only norms (and OPT/Phi biases of norms) are not
    assert 0.9 < coverage < 1.0
    assert f"{coverage:.1%} of the transformer-block parameters" in _info_text(tmp_path / "db")


@pytest.mark.parametrize("name, pattern", [("opt", "*.fc1"), ("qwen2-moe", "*.shared_expert.*")])
def test_flattened_token_inputs_give_each_sequence_its_own_gradient(tmp_path, name, pattern):
    """OPT's MLP and Qwen2-MoE's shared expert see (B·T, d) inputs: a padded batch must still give
    every sequence exactly the gradient autograd gives it alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_architecture_folder(tmp_path, name),
                                                 experts_implementation="eager").double().eval()
    modules = find_tracked_modules(model, (pattern,))
    tokens = token_lists(5, vocab=100)
    batch = lm_batches(tokens, len(tokens))[0]
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    captures, _ = GradientRunner(model, CausalLMTask(), modules, dtype=torch.float64).train_captures(batch)
    layers = dict(model.named_modules())
    for row, ids in enumerate(tokens):
        model.zero_grad(set_to_none=True)
        CausalLMTask().train_loss(model, lm_batches([ids], 1)[0]).backward()
        for m in modules:
            layer: nn.Linear = layers[m.name]
            expected = layer.weight.grad if layer.bias is None else torch.cat(
                [layer.weight.grad, layer.bias.grad.unsqueeze(-1)], dim=-1)
            torch.testing.assert_close(per_sequence_gradients(captures[m.name])[row], expected,
                                       rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_fused_experts_are_refused_by_name_and_explicit_modules_build(tmp_path, small_corpus):
    folder = make_architecture_folder(tmp_path / "mixtral", "mixtral")
    args = ["build", str(tmp_path / "db"), "--corpus", str(small_corpus), "--model", str(folder), "--quiet",
            *[f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "model.layers.*.mlp.experts.gate_up_proj" in message and "--modules" in message
    assert not (tmp_path / "db" / "manifest.json").exists(), "a refused fit must leave nothing behind"

    built = CliRunner().invoke(main, args + ["--modules", "*.self_attn.*"])
    assert built.exit_code == 0, built.output
    with api.open(tmp_path / "db") as db:
        assert db.verify().rows > 0 and len(db.query("the cat sat", " over the river", k=2).hits) == 2
        coverage = db.info()["block_coverage"]
    assert 0.05 < coverage < 0.5  # attention only: the experts hold most of the weights
    assert f"{coverage:.1%} of the transformer-block parameters" in _info_text(tmp_path / "db")

    # a database made before coverage was measured (resealed: a hand edit fails the manifest checksum)
    rewrite_manifest(tmp_path / "db", lambda manifest: manifest.pop("block_coverage"))
    assert "not recorded" in _info_text(tmp_path / "db")
