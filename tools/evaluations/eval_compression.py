"""Row compressions at equal bytes on trained models: which one keeps the EK-FAC scores?

For budgets of 1/16, 1/64, 1/256 and 1/1024 of the dense float32 ``Ĝ`` (bytes per row =
fraction × 4 × Σ d_out·d_in over the tracked modules) four compressions of the same
preconditioned gradients ``Ĝ = (Q_Sᵀ G Q_A) ⊘ √(Λ+λ)`` are compared with the exhaustive
full-space EK-FAC scores (``InfluenceComputer.precondition`` + ``pairwise_scores``):

(a) ``eigen Λ/(Λ+λ)`` (ours): ``attribdb.rows.plan_rows(factors, row_bytes)`` +
    ``RowProjection.from_plan(...).encode(captures)``: per module the block of ``Ĝ`` on the
    eigenvectors of S and A that carry the most expected share Λ/(Λ+λ), one budget for the row.
(b) ``PCA (LoGra)``: per module the top-k eigenvectors of S and of A by their *own* eigenvalues,
    k_out = k_in = k with every module given the same share of the budget (as LoGra and bergson
    give every module the same k; a side shorter than k is capped and the rest of the share goes to
    the other side); the block of ``Ĝ`` on them, built with the same ``BlockMap``/``RowProjection``
    classes from explicit indices.  The eigenvalues: the factors are fitted here in two steps with
    attribdb.fitting (a ``kfac`` fit, whose stored diagonal is eigvals(S) ⊗ eigvals(A), then the
    EK-FAC eigenvalue correction ``fitting._diagonal_pass`` on the same bases and seed, which is
    exactly what ``fit_factors`` with ``ekfac`` computes); S's eigenvectors are ordered by the row
    sums of that K-FAC product and A's by its column sums, which equal eigvals(S)·tr(A) and
    eigvals(A)·tr(S): the order of the eigenvalues themselves.
(c) ``random Kron.`` (bergson's and LoGra's default): per module ``vec(R_out Ĝ R_inᵀ)`` with
    seeded Gaussian R_out (k_out × d_out), R_in (k_in × d_in) of variance 1/k (so the projection
    is unbiased), the same k's as (b), applied to the dense ``Ĝ``.  The query gets the same R.
(d) ``rank-r SVD`` (the previous representation): per module the truncated SVD of ``Ĝ_m`` with
    U, V in float16 (2·r·(d_out+d_in) bytes per module; σ in float32 is not charged); r is the
    same for every module, the largest the budget allows, and the bytes left over give one more
    rank to modules in order of size.  The SVD is a randomized SVD written here (Gaussian range
    finder, 8 extra columns, 3 power iterations with QR), run once at the largest rank and
    truncated per budget.  It scores as the previous rescoring did: the query's full ``Ĝ_q``
    against ``U diag(σ) Vᵀ``, normalized by the full self-influences the previous format stored.
    Those scores need the full ``Ĝ_q`` and about d_out·d_in work per (query, row, rank): they are
    not a vector FAISS can hold (the previous format searched a separate sketch), so its recall
    here is that of rescoring *every* row from the stored factors, an upper bound for that design.

Two diagnostic lines follow the four.  ``PCA, our k's`` keeps (a)'s k_out, k_in per module but
picks the eigenvectors by the K-FAC eigenvalues as (b) does: it separates the choice of
eigenvectors (Λ/(Λ+λ) against eigvals(S), eigvals(A)) from the split of the budget over modules.
``eigen E_data[Ĝ²]`` is (a)'s planner (``plan_rows`` itself, its coordinate weights swapped in)
spending the budget by the share each coordinate carries of the *training rows'* self-influence,
``E_data[(Q_Sᵀ G Q_A)²] / (Λ+λ)`` measured with the data's own labels on the fitting sample
(``fitting._diagonal_pass`` with ``sample=False``), instead of the true-Fisher expectation
Λ/(Λ+λ); the block is still divided by √(Λ+λ) of the true-Fisher Λ, so it scores the same Ĝ.

Rows of (a)–(c) are stored as attribdb stores them (unit vector in float16, squared norm in
float32: ``rows.to_stored``); the query row stays in float32, as at query time.  The budget
counts those 4 bytes of norm for (a)–(c).

Per method and budget the table prints: bytes per row; the mean share of the rows'
self-influence the compressed row keeps (for the random projection an unbiased estimate, so about
1); Pearson and Spearman of the compressed scores against the exhaustive ones over every (query,
row) pair; recall@10 and @100 of the compressed top (brute force over every row, which is what a
flat index returns) against the exhaustive top, for both rankings (``cos``: normalized, the
default; ``score``: the raw score); fact-tracing MRR of the first document stating the queried fact
(documents ranked by the compressed scores, as tools/evaluations/eval_facts.py ranks them; the queries are the
demo's held-out fact prompts, so a query never uses a document's phrasing); and the encoding
throughput (sequences/s of forward + backward + that method's row) relative to a plain
training forward+backward (loss.backward() into the weights), both measured in this run on the
same sequences, each method timed between two plain passes (the machine may be shared) and
compared with their mean.  The ``exhaustive`` line is the dense ``Ĝ``: the ground truth's own MRR and the
cost of forming it.

Rows are documents cut to --max-length tokens (one row per document, so a document's rank is its
row's rank): every fact and distractor document, then background documents at random up to --rows.
Factors are fitted (true Fisher, λ = 0.1·mean Λ) on --fit-sequences documents drawn at random.

Run: OMP_NUM_THREADS=1 python -m tools.evaluations.eval_compression --model-set both [--rows 1000 --queries 60]
(the models are trained and cached in --workdir on first use: tools/evaluations/trained_models.py).  With
--rows 1000 the demo model takes about 2.5 minutes, the second model about 9 minutes of CPU (20 wall
on a shared, loaded 2-core machine: its rows cost a dense 12 MiB Ĝ each).  Throughput ratios are
only as steady as the machine: on a shared machine read them to within a factor of about 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tools.evaluations.baselines import mrr_and_recall
from tools.evaluations.trained_models import MODEL_SETS, TrainedModel, add_evaluation_options

FRACTIONS = (16, 64, 256, 1024)  # budget = dense float32 Ĝ / fraction
METHODS = ("eigen Λ/(Λ+λ)", "PCA (LoGra)", "random Kron.", "rank-r SVD", "PCA, our k's", "eigen E_data[Ĝ²]")
EXHAUSTIVE = "exhaustive"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- factors: K-FAC eigenvalues for the PCA order, EK-FAC for everything ---------


def fit_both(model, task, modules, batches, seed: int = 0):
    """(ekfac factors, per module the K-FAC product eigvals(S) ⊗ eigvals(A)).

    The same two passes ``fit_factors(..., FactorConfig("ekfac"))`` makes, keeping the K-FAC
    eigenvalues that the ekfac factors replace with the corrected Λ."""
    from attribdb import fitting
    from attribdb.factors import FactorConfig, Factors, ModuleFactors, damping_for
    from attribdb.gradients import GradientRunner

    kfac = fitting.fit_factors(model, task, batches, FactorConfig("kfac", seed=seed), modules)
    config = FactorConfig("ekfac", seed=seed)
    runner = GradientRunner(model, task, modules)
    bases = {name: ModuleFactors(f.eigvecs_out, f.eigvecs_in, None, 0.0) for name, f in kfac.per_module.items()}
    diagonals, n_sequences = fitting._diagonal_pass(runner, batches, bases, config.fisher == "true", config.seed + 1,
                                                     None)
    per_module = {m.name: ModuleFactors(kfac[m.name].eigvecs_out, kfac[m.name].eigvecs_in, diagonals[m.name],
                                        damping_for(diagonals[m.name], config)) for m in modules}
    ekfac = Factors(config, list(modules), per_module, {**kfac.info, "n_sequences": n_sequences})
    observed, _ = fitting._diagonal_pass(runner, batches, bases, False, config.seed + 2, None)
    data_weights = {m.name: observed[m.name].double() / (per_module[m.name].diagonal.double().clamp_min(0)
                                                        + per_module[m.name].damping) for m in modules}
    return ekfac, {name: f.diagonal for name, f in kfac.per_module.items()}, data_weights


def plan_by_weights(factors, weights: dict, row_bytes: int):
    """``rows.plan_rows`` itself, with the per-coordinate weights replaced by ``weights`` (the diagnostic line)."""
    from attribdb import rows

    original = rows._coordinate_weights
    lookup = {id(factors[name]): weight for name, weight in weights.items()}
    rows._coordinate_weights = lambda module_factors, d_out, d_in: lookup[id(module_factors)]
    try:
        return rows.plan_rows(factors, row_bytes)
    finally:
        rows._coordinate_weights = original


# ---- the four compressions ------------------------------------------------------


def square_block(numbers: int, d_out: int, d_in: int) -> tuple[int, int]:
    """k_out = k_in = k with k² ≤ numbers; a side shorter than k is capped, the other widened."""
    k = max(1, int(np.sqrt(numbers)))
    if k <= min(d_out, d_in):
        return k, k
    if d_out < d_in:
        return d_out, max(1, min(d_in, numbers // d_out))
    return max(1, min(d_out, numbers // d_in)), d_in


def uniform_blocks(modules, row_bytes: int) -> list[tuple[int, int]]:
    share = ((row_bytes - 4) // 2) // len(modules)  # float16 numbers per module, 4 bytes for the norm
    return [square_block(share, m.d_out, m.d_in) for m in modules]


def pca_projection(factors, kfac_products: dict, row_bytes: int, blocks: list | None = None):
    """(b); with ``blocks``, the PCA order at those k's instead of the uniform ones (the diagnostic line)."""
    from attribdb.rows import RowLayout, RowProjection, _block_map

    modules = list(factors.modules)
    blocks = list(blocks) if blocks is not None else uniform_blocks(modules, row_bytes)
    maps = {}
    for m, (k_out, k_in) in zip(modules, blocks):
        product = kfac_products[m.name].double()
        out_index = torch.argsort(product.sum(1), descending=True, stable=True)[:k_out]
        in_index = torch.argsort(product.sum(0), descending=True, stable=True)[:k_in]
        maps[m.name] = _block_map(factors[m.name], m, out_index, in_index)
    return RowProjection(RowLayout(tuple(modules), tuple(blocks)), maps)


@dataclass
class RandomKronecker:
    modules: list
    blocks: list[tuple[int, int]]
    seed: int = 0
    maps: dict = field(default_factory=dict)

    def __post_init__(self):
        generator = torch.Generator().manual_seed(self.seed)
        for m, (k_out, k_in) in zip(self.modules, self.blocks):
            self.maps[m.name] = (torch.randn(k_out, m.d_out, generator=generator) / np.sqrt(k_out),
                                 torch.randn(k_in, m.d_in, generator=generator) / np.sqrt(k_in))

    @property
    def dim(self) -> int:
        return sum(a * b for a, b in self.blocks)

    def encode(self, dense: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(out @ dense[m.name] @ inp.T).flatten(1)
                          for m in self.modules for out, inp in [self.maps[m.name]]], dim=1)


def svd_ranks(modules, row_bytes: int) -> list[int]:
    """One rank for every module, the largest that fits; leftover bytes buy one more rank, largest modules first."""
    costs = [2 * (m.d_out + m.d_in) for m in modules]
    rank = row_bytes // sum(costs)
    ranks = [min(rank, m.d_out, m.d_in) for m in modules]
    left = row_bytes - sum(r * c for r, c in zip(ranks, costs))
    for i in sorted(range(len(modules)), key=lambda i: -modules[i].d_out * modules[i].d_in):
        if costs[i] <= left and ranks[i] < min(modules[i].d_out, modules[i].d_in):
            ranks[i] += 1
            left -= costs[i]
    return ranks


def randomized_svd(matrices: torch.Tensor, rank: int, generator: torch.Generator, oversample: int = 8,
                   power_iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``rank`` singular triplets of each (m, n) matrix of a (B, m, n) batch: U (B, m, r), σ (B, r), V (B, n, r)."""
    batch, rows, cols = matrices.shape
    width = min(rank + oversample, rows, cols)
    probe = torch.randn(batch, cols, width, generator=generator, dtype=matrices.dtype)
    basis = torch.linalg.qr(matrices @ probe).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrices @ torch.linalg.qr(matrices.transpose(1, 2) @ basis).Q).Q
    small_u, sigma, small_vh = torch.linalg.svd(basis.transpose(1, 2) @ matrices, full_matrices=False)
    return (basis @ small_u)[..., :rank], sigma[..., :rank], small_vh.transpose(1, 2)[..., :rank]


def low_rank(u, sigma, v, rank: int) -> torch.Tensor:
    """U diag(σ) Vᵀ at ``rank`` with U, V rounded to float16 as they were stored."""
    u16, v16 = u[..., :rank].half().float(), v[..., :rank].half().float()
    return (u16 * sigma[:, None, :rank]) @ v16.transpose(1, 2)


# ---- data -------------------------------------------------------------------------


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


# ---- metrics ----------------------------------------------------------------------


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


# ---- throughput --------------------------------------------------------------------


def seconds(fn, batches, repeats: int = 1) -> float:
    fn(batches[0][1])  # warm up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _, batch in batches:
            fn(batch)
        best = min(best, time.perf_counter() - started)
    return best


# ---- one model ---------------------------------------------------------------------


def evaluate(trained: TrainedModel, args) -> tuple[dict, list[dict]]:
    from attribdb.influence import InfluenceComputer, self_influence
    from attribdb.models import load_model
    from attribdb.rows import RowProjection, plan_rows, to_stored
    from attribdb.tasks import CausalLMTask, collate_sequences
    from attribdb.tracking import find_tracked_modules

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(trained.model_dir, "cpu")
    task = CausalLMTask()
    modules = find_tracked_modules(model, task.module_patterns)
    pad = tokenizer.pad_token_id
    doc_ids, row_ids, docs = choose_rows(trained.corpus, tokenizer, args.rows, args.max_length, args.seed)
    facts = round_robin(trained.facts, args.queries)
    log(f"{trained.name}: {len(modules)} modules, {len(doc_ids)} rows, {len(facts)} queries")

    sample = random.Random(args.seed + 1).sample(docs, min(args.fit_sequences, len(docs)))
    fit_ids = [tokenizer(d["text"])["input_ids"][:args.max_length] for d in sample]
    fit_batches = [b for _, b in batches_of([t for t in fit_ids if len(t) >= 2], pad, args.batch_size)]
    started = time.time()
    factors, kfac_products, data_weights = fit_both(model, task, modules, fit_batches, args.seed)
    log(f"fitted factors on {len(fit_batches)} batches in {time.time() - started:.0f}s")
    computer = InfluenceComputer(model, task, factors)
    runner = computer.runner

    dense_bytes = 4 * sum(m.d_out * m.d_in for m in modules)
    budgets = {f: dense_bytes // f for f in FRACTIONS}
    ours = {f: RowProjection.from_plan(factors, plan_rows(factors, b)) for f, b in budgets.items()}
    pca = {f: pca_projection(factors, kfac_products, b) for f, b in budgets.items()}
    pca_ours = {f: pca_projection(factors, kfac_products, b, ours[f].layout.blocks) for f, b in budgets.items()}
    ours_data = {f: RowProjection.from_plan(factors, plan_by_weights(factors, data_weights, b))
                 for f, b in budgets.items()}
    rand = {f: RandomKronecker(modules, uniform_blocks(modules, b), seed=args.seed + f) for f, b in budgets.items()}
    ranks = {f: svd_ranks(modules, b) for f, b in budgets.items()}
    max_rank = {m.name: max(ranks[f][i] for f in FRACTIONS) for i, m in enumerate(modules)}
    row_bytes = {}
    for f in FRACTIONS:
        row_bytes[(METHODS[0], f)] = ours[f].layout.bytes_per_row
        row_bytes[(METHODS[1], f)] = pca[f].layout.bytes_per_row
        row_bytes[(METHODS[2], f)] = 2 * rand[f].dim + 4
        row_bytes[(METHODS[3], f)] = sum(2 * r * (m.d_out + m.d_in) for r, m in zip(ranks[f], modules))
        row_bytes[(METHODS[4], f)] = pca_ours[f].layout.bytes_per_row
        row_bytes[(METHODS[5], f)] = ours_data[f].layout.bytes_per_row

    # queries: dense Ĝ_q, and each method's query row
    prompts = [tokenizer(f.prompt)["input_ids"] for f in facts]
    completions = [tokenizer(f.completion)["input_ids"] for f in facts]
    query_batch = collate_sequences([p + c for p, c in zip(prompts, completions)], pad, [len(p) for p in prompts])
    query_captures = runner.measurement_captures(query_batch)[0]
    query_dense = computer.precondition(query_captures)
    query_self = self_influence(query_dense)
    query_rows = {}
    for f in FRACTIONS:
        query_rows[(METHODS[0], f)] = ours[f].encode(query_captures)
        query_rows[(METHODS[1], f)] = pca[f].encode(query_captures)
        query_rows[(METHODS[2], f)] = rand[f].encode(query_dense)
        query_rows[(METHODS[4], f)] = pca_ours[f].encode(query_captures)
        query_rows[(METHODS[5], f)] = ours_data[f].encode(query_captures)

    # every row: exhaustive scores and each compression's scores and normalized scores
    n_rows = len(row_ids)
    truth = torch.zeros(len(facts), n_rows, dtype=torch.float64)
    row_self = torch.zeros(n_rows, dtype=torch.float64)
    scores = {(m, f): torch.zeros(len(facts), n_rows, dtype=torch.float64) for m in METHODS for f in FRACTIONS}
    cosines = {key: torch.zeros_like(value) for key, value in scores.items()}
    kept = {key: torch.zeros(n_rows, dtype=torch.float64) for key in scores}
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    row_batches = batches_of(row_ids, pad, args.batch_size)
    for number, (positions, batch) in enumerate(row_batches):
        captures = runner.train_captures(batch)[0]
        dense = computer.precondition(captures)
        full_self = self_influence(dense).double()
        row_self[positions] = full_self
        rows = {}
        for f in FRACTIONS:
            rows[(METHODS[0], f)] = ours[f].encode(captures)
            rows[(METHODS[1], f)] = pca[f].encode(captures)
            rows[(METHODS[2], f)] = rand[f].encode(dense)
            rows[(METHODS[4], f)] = pca_ours[f].encode(captures)
            rows[(METHODS[5], f)] = ours_data[f].encode(captures)
        for key, row in rows.items():
            unit, squared = to_stored(row)
            unit, squared = torch.from_numpy(unit).float(), torch.from_numpy(squared).double()
            query = query_rows[key]
            dot = (query @ unit.T).double()
            scores[key][:, positions] = dot * squared.sqrt()
            cosines[key][:, positions] = dot / query.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
            kept[key][positions] = squared / full_self.clamp_min(1e-300)
        # the exhaustive scores and the rank-r scores (query Ĝ_q against U diag(σ) Vᵀ) in one product per module
        approx = {m.name: [dense[m.name]] for m in modules}
        for m in modules:
            if max_rank[m.name] > 0:
                factored = randomized_svd(dense[m.name], max_rank[m.name], generator)
            for r in (ranks[f][modules.index(m)] for f in FRACTIONS):
                approx[m.name].append(low_rank(*factored, r) if r > 0 else torch.zeros_like(dense[m.name]))
        stacked = {name: torch.cat(parts) for name, parts in approx.items()}
        products = flat_scores(query_dense, stacked).double().split(len(positions), dim=1)
        truth[:, positions] = products[0]
        for f, score, number_f in zip(FRACTIONS, products[1:], range(1, len(FRACTIONS) + 1)):
            key = (METHODS[3], f)
            scores[key][:, positions] = score
            norms = (query_self.double()[:, None] * full_self[None, :]).sqrt()
            cosines[key][:, positions] = score / norms.clamp_min(1e-300)
            kept_squares = sum((parts[number_f].flatten(1).double() ** 2).sum(1) for parts in approx.values())
            kept[key][positions] = kept_squares / full_self.clamp_min(1e-300)
        if (number + 1) % 25 == 0 or number + 1 == len(row_batches):
            log(f"rows {min((number + 1) * args.batch_size, n_rows)}/{n_rows} ({time.time() - started:.0f}s)")
    truth_cos = truth / (query_self.double()[:, None] * row_self[None, :]).sqrt().clamp_min(1e-300)

    # throughput on the same sequences for every method
    subset = batches_of(row_ids[:args.throughput_sequences], pad, args.batch_size)
    n_subset = sum(len(p) for p, _ in subset)

    def plain_step(batch):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            task.train_loss(model, batch).backward()

    timer_generator = torch.Generator().manual_seed(args.seed)

    def svd_encoder(f):
        def encode(batch):
            dense = computer.precondition(runner.train_captures(batch)[0])
            return [randomized_svd(dense[m.name], r, timer_generator) for m, r in zip(modules, ranks[f]) if r > 0]
        return encode

    encoders = {(EXHAUSTIVE, 0): lambda b: computer.precondition(runner.train_captures(b)[0])}
    for f in FRACTIONS:
        encoders[(METHODS[0], f)] = lambda b, p=ours[f]: p.encode(runner.train_captures(b)[0])
        encoders[(METHODS[1], f)] = lambda b, p=pca[f]: p.encode(runner.train_captures(b)[0])
        encoders[(METHODS[2], f)] = lambda b, p=rand[f]: p.encode(computer.precondition(runner.train_captures(b)[0]))
        encoders[(METHODS[3], f)] = svd_encoder(f)
        encoders[(METHODS[4], f)] = lambda b, p=pca_ours[f]: p.encode(runner.train_captures(b)[0])
        encoders[(METHODS[5], f)] = lambda b, p=ours_data[f]: p.encode(runner.train_captures(b)[0])
    started = time.time()
    ratios, plain_times = {}, []
    before = seconds(plain_step, subset, args.repeats)
    for key, fn in encoders.items():  # each method between two plain passes: the machine is shared, load drifts
        encoding = seconds(fn, subset, args.repeats)
        after = seconds(plain_step, subset, args.repeats)
        ratios[key] = (before + after) / 2 / encoding
        plain_times.append(before)
        before = after
    plain = float(np.median(plain_times + [before]))
    model.zero_grad(set_to_none=True)
    log(f"throughput on {n_subset} sequences in {time.time() - started:.0f}s "
        f"(plain forward+backward {n_subset / plain:.1f} seq/s)")

    results = [{"method": EXHAUSTIVE, "fraction": 1, "bytes": dense_bytes, "kept": 1.0, "pearson": 1.0,
                "spearman": 1.0, "r10_cos": 1.0, "r100_cos": 1.0, "r10_score": 1.0, "r100_score": 1.0,
                "mrr_cos": mean_mrr(truth_cos, doc_ids, facts), "mrr_score": mean_mrr(truth, doc_ids, facts),
                "throughput": ratios[(EXHAUSTIVE, 0)]}]
    for f in FRACTIONS:
        for method in METHODS:
            key = (method, f)
            results.append({
                "method": method, "fraction": f, "bytes": row_bytes[key], "kept": float(kept[key].mean()),
                "pearson": pearson(scores[key], truth), "spearman": spearman(scores[key], truth),
                "r10_cos": recall_at(cosines[key], truth_cos, 10), "r100_cos": recall_at(cosines[key], truth_cos, 100),
                "r10_score": recall_at(scores[key], truth, 10), "r100_score": recall_at(scores[key], truth, 100),
                "mrr_cos": mean_mrr(cosines[key], doc_ids, facts), "mrr_score": mean_mrr(scores[key], doc_ids, facts),
                "throughput": ratios[key]})
    header = {"model": trained.name, "modules": len(modules), "rows": n_rows, "queries": len(facts),
              "dense_bytes": dense_bytes, "plain_seq_per_s": n_subset / plain,
              "throughput_sequences": n_subset, "fit_sequences": len(fit_ids)}
    return header, results


def print_table(header: dict, results: list[dict]) -> None:
    print(f"\n== {header['model']}: {header['modules']} tracked modules, {header['rows']} rows, "
          f"{header['queries']} held-out fact queries, dense float32 Ĝ = {header['dense_bytes'] / 1024:.0f} KiB/row; "
          f"factors fitted on {header['fit_sequences']} sequences; throughput on {header['throughput_sequences']} "
          f"sequences, plain forward+backward {header['plain_seq_per_s']:.1f} seq/s")
    columns = ("budget", "method", "bytes/row", "kept", "Pearson", "Spearman", "R@10 cos", "R@100 cos",
               "R@10 score", "R@100 score", "MRR cos", "MRR score", "thru/f+b")
    print(f"{columns[0]:<7} {columns[1]:<17}" + "".join(f" {c:>11}" for c in columns[2:]))
    for r in results:
        budget = "dense" if r["method"] == EXHAUSTIVE else f"1/{r['fraction']}"
        print(f"{budget:<7} {r['method']:<17} {r['bytes']:>11,d} {r['kept']:>11.3f} {r['pearson']:>11.3f} "
              f"{r['spearman']:>11.3f} {r['r10_cos']:>11.3f} {r['r100_cos']:>11.3f} {r['r10_score']:>11.3f} "
              f"{r['r100_score']:>11.3f} {r['mrr_cos']:>11.3f} {r['mrr_score']:>11.3f} {r['throughput']:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_evaluation_options(parser, rows=1500)
    parser.add_argument("--throughput-sequences", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (the best is kept)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    started = time.time()
    tables = []
    for make in MODEL_SETS[args.model_set]:
        trained = make(args.workdir)
        tables.append(evaluate(trained, args))
    if args.json:
        args.json.write_text(json.dumps([{"header": h, "results": r} for h, r in tables], indent=1))
    for header, results in tables:
        print_table(header, results)
    print(f"\n{time.time() - started:.0f}s in all")


if __name__ == "__main__":
    main()
