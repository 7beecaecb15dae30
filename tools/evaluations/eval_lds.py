"""Linear datamodeling score (LDS) of identity, diagonal, K-FAC and EK-FAC influence.

Benchmark: an MLP classifier on scikit-learn's bundled digits (no download),
retrained in well under a second.  Train models on many random halves of the
training set; for each test query, correlate (Spearman) the influence
predicted for each half, ``−Σ_{m∈S} score(q, m)`` (a higher score lowers the
query loss), with the query loss actually reached by the model trained on that
half.  The LDS is that correlation averaged over queries.  Representation
similarity (cosine of hidden activations) is the baseline.

Run: python -m tools.evaluations.eval_lds [--subsets 60] [--seeds 2]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from attribdb.factors import STRATEGIES, FactorConfig
from attribdb.fitting import fit_factors
from attribdb.influence import InfluenceComputer, pairwise_scores
from attribdb.tasks import ClassificationTask
from attribdb.tracking import find_tracked_modules

N_TRAIN, N_QUERY, HIDDEN, STEPS = 1000, 60, 32, 400


def load_digits_tensors():
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float64) / 16.0
    targets = torch.tensor(data.target)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    inputs, targets = inputs[order], targets[order]
    return ((inputs[:N_TRAIN], targets[:N_TRAIN]),
            (inputs[N_TRAIN:N_TRAIN + N_QUERY], targets[N_TRAIN:N_TRAIN + N_QUERY]))


def train(inputs, targets, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model.eval()


def query_losses(model, queries) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(queries[0]), queries[1], reduction="none")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = (torch.argsort(torch.argsort(v)).double() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=2, help="models averaged per subset")
    args = parser.parse_args()

    train_set, queries = load_digits_tensors()
    full = train(*train_set, seed=0)
    task = ClassificationTask()
    modules = find_tracked_modules(full)
    batches = [(train_set[0][i:i + 100], train_set[1][i:i + 100]) for i in range(0, N_TRAIN, 100)]
    scores = {}
    for strategy in STRATEGIES:
        factors = fit_factors(full, task, batches, FactorConfig(strategy), modules, dtype=torch.float64)
        computer = InfluenceComputer(full, task, factors, dtype=torch.float64)
        train_pre = computer.train_preconditioned(train_set)
        per_query = [computer.query_preconditioned((queries[0][i:i + 1], queries[1][i:i + 1])) for i in range(N_QUERY)]
        scores[strategy] = torch.cat([pairwise_scores(q, train_pre) for q in per_query])  # (queries, train)
    with torch.no_grad():
        hidden = lambda x: nn.functional.normalize(torch.tanh(full[0](x)), dim=1)  # noqa: E731
        scores["representation similarity"] = hidden(queries[0]) @ hidden(train_set[0]).T

    generator = torch.Generator().manual_seed(1)
    masks, losses = [], []
    for _ in range(args.subsets):
        mask = torch.zeros(N_TRAIN, dtype=torch.bool)
        mask[torch.randperm(N_TRAIN, generator=generator)[: N_TRAIN // 2]] = True
        models = [train(train_set[0][mask], train_set[1][mask], seed=s) for s in range(args.seeds)]
        losses.append(torch.stack([query_losses(m, queries) for m in models]).mean(0))
        masks.append(mask)
    masks_t, losses_t = torch.stack(masks).double(), torch.stack(losses)  # (subsets, train), (subsets, queries)

    print(f"digits MLP 64-{HIDDEN}-10, {N_TRAIN} training examples, {N_QUERY} queries, {args.subsets} random halves "
          f"× {args.seeds} seeds")
    print(f"{'method':<28} {'LDS':>7}")
    for method, score in scores.items():
        predicted = -(masks_t @ score.T)  # (subsets, queries): higher score -> lower loss
        lds = sum(spearman(predicted[:, q], losses_t[:, q]) for q in range(N_QUERY)) / N_QUERY
        print(f"{method:<28} {lds:>7.3f}")


if __name__ == "__main__":
    main()
