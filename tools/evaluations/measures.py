"""Measures the fidelity evaluations share: the evaluation's rows and batches, correlations, recall
and fact-tracing MRR of score matrices (queries × rows)."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tools.evaluations.baselines import mrr_and_recall


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def round_robin(facts, count: int):
    """Facts alternating over relations, so a few queries cover every relation."""
    by_relation: dict[str, list] = {}
    for fact in facts:
        by_relation.setdefault(fact.relation, []).append(fact)
    ordered = [f for group in zip(*by_relation.values()) for f in group]
    return ordered[:count]


def choose_rows(corpus: Path, tokenizer, count: int, max_length: int, seed: int):
    docs = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    facts = [d for d in docs if d.get("kind") in ("fact", "distractor")]
    background = [d for d in docs if d.get("kind") not in ("fact", "distractor")]
    random.Random(seed).shuffle(background)
    chosen = (facts + background)[:count]
    ids = [tokenizer(d["text"])["input_ids"][:max_length] for d in chosen]
    keep = [i for i, t in enumerate(ids) if len(t) >= 2]
    return [chosen[i]["id"] for i in keep], [ids[i] for i in keep], docs


def batches_of(token_ids: list[list[int]], pad_id: int, size: int) -> list[tuple[list[int], dict]]:
    """(row positions, batch) over sequences grouped by length (less padding)."""
    from attribdb.tasks import collate_sequences

    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    return [(order[s:s + size], collate_sequences([token_ids[i] for i in order[s:s + size]], pad_id))
            for s in range(0, len(order), size)]


def flat_scores(left: dict, right: dict) -> torch.Tensor:
    """``influence.pairwise_scores`` as one matrix product per module (its einsum is ~6× slower here on CPU)."""
    return sum(left[name].flatten(1) @ right[name].flatten(1).T for name in left)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()).clamp_min(1e-300))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    def ranks(t):
        t = t.double().flatten()
        out = torch.empty_like(t)
        out[torch.argsort(t)] = torch.arange(len(t), dtype=torch.float64)
        return out

    return pearson(ranks(x), ranks(y))


def recall_at(mine: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    k = min(k, truth.shape[1])
    found = torch.topk(mine, k, dim=1).indices
    wanted = torch.topk(truth, k, dim=1).indices
    return float(np.mean([len(set(f.tolist()) & set(w.tolist())) / k for f, w in zip(found, wanted)]))


def mean_mrr(keys: torch.Tensor, doc_ids: list[str], facts) -> float:
    values = []
    for row, fact in zip(keys, facts):
        ranking = [doc_ids[i] for i in torch.argsort(row, descending=True).tolist()]
        values.append(mrr_and_recall(ranking, set(fact.doc_ids))[0])
    return float(np.mean(values))
