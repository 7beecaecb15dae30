"""Recomputation: rows' exact EK-FAC scores from their stored tokens, within a compute budget.

Stored rows hold most of a score (docs/evidence.md), but not all of it: the
components a row had no room for, and 4-bit rounding.  Recomputing the best
candidates in full (a forward and backward pass per row, rotated into the
factors' eigenbases) gives their exact scores and order.  How many rows are
recomputed is ``QueryOptions.rescore``; by default as many as fit in a small
budget of floating-point operations per query (:data:`RESCORE_FLOPS`), so a
small model recomputes the first few candidates of each end and a large one on
a CPU none: the answer is then the stored rows' ranking.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from attribdb.influence import eigenbasis_scores, token_contributions
from attribdb.query.gradients import SolvedQueries
from attribdb.query.options import QueryOptions
from attribdb.query.results import Hit
from attribdb.query.scored import ScoredRows
from attribdb.query.store import RowStore
from attribdb.rows import scoring_flops
from attribdb.runtime import Runtime
from attribdb.tasks import collate_sequences

# Floating-point operations per query that default recomputation may spend, per device type: about 0.5 s
# of one CPU core, or a small fraction of a second of a GPU.  About fifteen candidates of each end of the
# demo model fit; on GPT-2 small on a CPU, none does (tools/benchmarks/bench_query.py prints the
# trade-off).  On the real-text model, 10¹⁰ left recall@10 against exhaustive at the stored rows' 0.944
# and 10¹¹ raised it to 0.992 at 1.5 s a query (tools/evaluations/eval_rows.py).
RESCORE_FLOPS = {"cpu": 3e10, "cuda": 6e12}
LENGTH_SAMPLE = 64  # rows whose lengths price a recomputed row


class Recomputer:
    def __init__(self, runtime: Runtime, store: RowStore):
        self.runtime, self.store = runtime, store
        self.batch_size = runtime.manifest.settings.batch_size
        self.flops_per_token = self._flops_per_token()

    def _flops_per_token(self) -> float:
        """What recomputing one training token costs: a forward and backward pass (~6 operations
        per weight) plus, per module, rotating δ and a into the eigenbases and forming the rotated
        gradient and its products (~2(d_out² + d_in²) + 4·d_out·d_in)."""
        weights = sum(p.numel() for p in self.runtime.model.parameters())
        rotations = sum(2 * (m.d_out ** 2 + m.d_in ** 2) + 4 * m.d_out * m.d_in for m in self.runtime.manifest.modules)
        return 6.0 * weights + rotations

    @cached_property
    def row_flops(self) -> float:
        """What recomputing one stored row costs, from the mean length of up to
        :data:`LENGTH_SAMPLE` rows spread over the database."""
        shards, rows, _ = self.store.every_row()
        picked = np.unique(np.linspace(0, len(rows) - 1, min(LENGTH_SAMPLE, len(rows))).round().astype(int))
        records = self.store.records(list(zip(shards[picked].tolist(), rows[picked].tolist())))
        tokens = np.mean([r.token_span[1] - r.token_span[0] for r in records]) if records else 0.0
        return self.flops_per_token * float(tokens)

    @property
    def default_budget(self) -> float:
        """Floating-point operations default recomputation may spend per query on this device."""
        return RESCORE_FLOPS.get(self.runtime.device.type, RESCORE_FLOPS["cpu"])

    def index_flops(self, options: QueryOptions, checkpoints: int = 1) -> float:
        """What one query in index mode costs at this checkpoint: its candidates scored from their
        stored rows, then recomputed as ``options.rescore`` asks, or as this checkpoint's share of
        the default budget, which :meth:`choose` spends once over all ``checkpoints``."""
        ends = 2 if options.opponents else 1
        stored = ends * options.pool * scoring_flops(self.runtime.row_layout)
        everything = ends * options.pool * self.row_flops
        if options.rescore is not None:
            return stored + min(everything, ends * options.rescore * self.row_flops)
        return stored + min(everything, self.default_budget / checkpoints)

    def exhaustive_flops(self) -> float:
        """What one exhaustive pass costs, for any number of queries: every row recomputed once."""
        return self.store.rows * self.row_flops

    def choose(self, scored: ScoredRows, options: QueryOptions, checkpoints: int = 1) -> dict[str, np.ndarray]:
        """Per end, a mask of the rows to recompute: its best ``options.rescore`` by the compressed
        key, or by default, alternating between the ends best first, as many as the device's
        :data:`RESCORE_FLOPS` pays for (a row costs a recomputation at each of ``checkpoints``)."""
        key = scored.key(options.rank_by)
        orders = {"top": np.argsort(-key, kind="stable")}
        if options.opponents:
            orders["bottom"] = np.argsort(key, kind="stable")
        chosen = {end: np.zeros(len(key), dtype=bool) for end in orders}
        if options.rescore is not None:
            for end, order in orders.items():
                chosen[end][order[:options.rescore]] = True
            return chosen
        budget = self.default_budget
        for picks in zip(*orders.values()):
            for end, i in zip(orders, picks):
                if not any(mask[i] for mask in chosen.values()):  # each row's record read once, when reached
                    [record] = self.store.records([(scored.shards[i], scored.rows[i])])
                    budget -= checkpoints * self.flops_per_token * (record.token_span[1] - record.token_span[0])
                if budget < 0:
                    return chosen
                chosen[end][i] = True
        return chosen

    def row_scores(self, token_ids: list, inverse_hvp: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of one batch of rows, from their token ids: (Q, B, modules) per query and
        module, and (B,) the rows' own self-influence."""
        computer = self.runtime.computer
        captures, _ = computer.runner.train_captures(collate_sequences(token_ids, self.runtime.tokenizer.pad_token_id))
        exact = eigenbasis_scores(computer.factors, inverse_hvp, captures, self.store.modules)
        return exact.per_module.double().cpu().numpy(), exact.self_influence.double().cpu().numpy()

    def recompute(self, scored: list[ScoredRows], solved: SolvedQueries) -> None:
        """Exact scores of the rows each query chose, each row recomputed once for all the queries
        that chose it, shortest first so batches carry little padding; then the queries' exact
        self-influence."""
        wanted: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (shard, row) -> [(query, index)]
        for q, s in enumerate(scored):
            for i in np.flatnonzero(np.logical_or.reduce(list(s.chosen.values()))):
                wanted.setdefault((int(s.shards[i]), int(s.rows[i])), []).append((q, int(i)))
        token_ids = dict(zip(wanted, (record.token_ids for record in self.store.records(wanted))))
        order = sorted(wanted, key=lambda pair: (len(token_ids[pair]), pair))
        for start in range(0, len(order), self.batch_size):
            pairs = order[start:start + self.batch_size]
            per_module, self_m = self.row_scores([token_ids[p] for p in pairs], solved.inverse_hvp)
            for b, pair in enumerate(pairs):
                for q, i in wanted[pair]:
                    scored[q].exact[i] = True
                    scored[q].exact_module_scores[i] = per_module[q, b]
                    scored[q].exact_scores[i] = per_module[q, b].sum()
                    scored[q].exact_self_influence[i] = self_m[b]
        for s, exact_self in zip(scored, solved.exact_self_influence):
            s.exact_query_self = float(exact_self)

    def contributions(self, hits: list[Hit], inverse_hvp: dict[str, torch.Tensor]) -> None:
        """Per-token contributions of hits' exact scores for one query's ``inverse_hvp`` (their rows
        recomputed once more, a batch at a time: only the rows shown pay for this)."""
        computer = self.runtime.computer
        for start in range(0, len(hits), self.batch_size):
            batch = hits[start:start + self.batch_size]
            token_ids = [record.token_ids for record in self.store.records([(h.shard, h.row) for h in batch])]
            captures, _ = computer.runner.train_captures(collate_sequences(token_ids,
                                                                           self.runtime.tokenizer.pad_token_id))
            split = token_contributions(computer.factors, inverse_hvp, captures).double().cpu()
            for hit, ids, row in zip(batch, token_ids, split):
                hit.tokens = [self.runtime.tokenizer.decode([t]) for t in ids]
                hit.token_contributions = row[:len(ids)].tolist()
