"""How close is each strategy's Fisher (and influence) to the explicit per-module Fisher?

For a small MLP classifier and a tiny GPT-2, both briefly trained, this fits
every strategy on a sample, builds the explicit per-module Fisher
``E_m[vec(G_m) vec(G_m)ᵀ]`` from the very pseudo-gradients (same sampled
labels) that EK-FAC's eigenvalue correction uses, and prints one line per
strategy and damping:

- ``fisher_dist``: ‖F_strategy − F‖_F / ‖F‖_F, summed over modules;
- ``pearson`` / ``spearman``: correlation of the strategy's query × train
  influence with the explicit influence ``g_qᵀ (F + λ_ref I)⁻¹ g_m`` at the
  same relative damping (``λ_ref = factor · trace(F) / n``, which is exactly
  EK-FAC's own λ because the correction preserves the trace).

The explicit F from N sequences has rank ≤ N per module, so at small damping
no Kronecker approximation can track it closely; the low-damping lines show
that limit rather than a defect.

Run: python -m tools.evaluations.eval_ekfac
"""

from __future__ import annotations

import torch
from torch import nn

from attribdb.factors import STRATEGIES, FactorConfig
from attribdb.fitting import fit_factors
from attribdb.gradients import GradientRunner
from attribdb.influence import InfluenceComputer, pairwise_scores
from attribdb.tasks import CausalLMTask, ClassificationTask, Task, collate_sequences
from attribdb.tracking import DEFAULT_LM_PATTERNS, find_tracked_modules, per_sequence_gradients

DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)
SEED = 0


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    def ranks(v):
        return torch.argsort(torch.argsort(v)).double()

    return pearson(ranks(x), ranks(y))


def mlp_setup():
    torch.manual_seed(SEED)
    inputs = torch.randn(600, 8, dtype=torch.float64)
    targets = (inputs[:, :3].sum(1) > 0).long() + (inputs[:, 3] > 1).long()
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[:400]), targets[:400]).backward()
        optimizer.step()
    batches = [(inputs[i:i + 50], targets[i:i + 50]) for i in range(0, 400, 50)]
    queries = [(inputs[400:420], targets[400:420])]
    return "mlp", model, ClassificationTask(), find_tracked_modules(model), batches, queries


def gpt2_setup():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                       bos_token_id=0, eos_token_id=0)).double()
    # a toy language with structure to learn: counting sequences with a random stride
    generator = torch.Generator().manual_seed(SEED)
    starts = torch.randint(0, 24, (400,), generator=generator)
    strides = torch.randint(1, 4, (400,), generator=generator)
    tokens = [[int((s + k * d) % 24) for k in range(12)] for s, d in zip(starts, strides)]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    task = CausalLMTask()
    for step in range(60):
        batch = collate_sequences(tokens[(step * 16) % 256:(step * 16) % 256 + 16], pad_id=0)
        optimizer.zero_grad()
        (task.train_loss(model, batch) / 16).backward()
        optimizer.step()
    batches = [collate_sequences(tokens[i:i + 32], pad_id=0) for i in range(0, 256, 32)]
    queries = [collate_sequences(tokens[300:316], pad_id=0, score_from=[6] * 16)]
    return "gpt2", model, task, find_tracked_modules(model, DEFAULT_LM_PATTERNS), batches, queries


def explicit_fishers(model: nn.Module, task: Task, modules, batches, seed: int) -> dict[str, torch.Tensor]:
    """E_m[vec G vec Gᵀ] from the pseudo-gradients of EK-FAC's correction pass (same seed, same labels)."""
    runner = GradientRunner(model, task, modules, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    grads = {m.name: [] for m in modules}
    for batch in batches:
        captures, _ = runner.train_captures(batch, sample=True, generator=generator)
        for name, capture in captures.items():
            grads[name].append(per_sequence_gradients(capture).flatten(1))
    fishers = {}
    for name, parts in grads.items():
        flat = torch.cat(parts)
        fishers[name] = flat.T @ flat / flat.shape[0]
    return fishers


def raw_gradients(model, task, modules, batches, measurement: bool) -> dict[str, torch.Tensor]:
    runner = GradientRunner(model, task, modules, dtype=torch.float64)
    out = {m.name: [] for m in modules}
    for batch in batches:
        captures, _ = runner.measurement_captures(batch) if measurement else runner.train_captures(batch)
        for name, capture in captures.items():
            out[name].append(per_sequence_gradients(capture).flatten(1))
    return {name: torch.cat(parts) for name, parts in out.items()}


def explicit_influence(fishers, query_grads, train_grads, factor: float) -> torch.Tensor:
    total = 0
    for name, fisher in fishers.items():
        n = fisher.shape[0]
        damping = factor * torch.trace(fisher) / n
        solved = torch.linalg.solve(fisher + damping * torch.eye(n, dtype=fisher.dtype), query_grads[name].T)
        total = total + solved.T @ train_grads[name].T
    return total


def evaluate(setup) -> list[str]:
    label, model, task, modules, batches, queries = setup
    fishers = explicit_fishers(model, task, modules, batches, seed=SEED + 1)
    query_grads = raw_gradients(model, task, modules, queries, measurement=True)
    train_grads = raw_gradients(model, task, modules, batches, measurement=False)
    lines = []
    for strategy in STRATEGIES:
        base = fit_factors(model, task, batches, FactorConfig(strategy, seed=SEED), modules, dtype=torch.float64)
        distance = "n/a"
        if base[modules[0].name].diagonal is not None:
            distance = sum(float(torch.linalg.matrix_norm(base[name].fisher_matrix() - f) / torch.linalg.matrix_norm(f))
                           for name, f in fishers.items()) / len(fishers)
            distance = f"{distance:.4f}"
        for factor in DAMPINGS:
            factors = base.with_damping(damping_factor=factor)
            computer = InfluenceComputer(model, task, factors, dtype=torch.float64)
            scores = torch.cat([pairwise_scores(computer.query_preconditioned(q),
                                                torch_cat_train(computer, batches)) for q in queries])
            reference = explicit_influence(fishers, query_grads, train_grads, factor)
            lines.append(f"{label:5s} {strategy:9s} damping={factor:<6g} fisher_dist={distance:>7s} "
                         f"pearson={pearson(scores.flatten(), reference.flatten()):+.4f} "
                         f"spearman={spearman(scores.flatten(), reference.flatten()):+.4f}")
    return lines


def torch_cat_train(computer: InfluenceComputer, batches):
    parts = [computer.train_preconditioned(b) for b in batches]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def main():
    lines = evaluate(mlp_setup()) + evaluate(gpt2_setup())
    print("model strategy  damping      fisher_dist (relative, mean over modules)  influence correlation "
          "with the explicit damped Fisher")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
