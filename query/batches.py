"""Batches of queries in chunks that fit memory, with progress on stderr: the one place a batch is cut.

A chunk's queries are solved together (one forward/backward pass, one
inverse-HVP each), so their dense gradients (one d_out × d_in matrix per
tracked module per query, a few copies alive at once) must fit a budget: a
720-query batch on the demo held them all at once and peaked at 4.5 GB, and
on GPT-2 small it would have held 240 GB.  Answers stream chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from attribdb.progress import progress_bar


@dataclass(frozen=True)
class ChunkBudget:
    """Memory a chunk's dense gradients may take, how many copies of them are alive at once, and
    the most queries a chunk gains anything from (None: no limit)."""

    memory: int
    copies: int
    most: int | None = None


# index and exact modes: captures, inverse-HVP and its projection; more than 64 queries per chunk
# gain nothing, their forward/backward is batched already
QUERY_BUDGET = ChunkBudget(memory=128 << 20, copies=3, most=64)
# exhaustive: a chunk is a pass over the whole corpus, so it gets more memory to need fewer passes;
# Ĝ_q is kept through the pass, plus its rotation while it is made
EXHAUSTIVE_BUDGET = ChunkBudget(memory=512 << 20, copies=2)


def queries_per_chunk(modules, itemsize: int, budget: ChunkBudget) -> int:
    """How many queries keep ``budget.copies`` gradient-sized tensors each (one number of
    ``itemsize`` bytes per tracked weight) within ``budget.memory``: at least one, at most ``budget.most``."""
    per_query = budget.copies * itemsize * sum(m.d_out * m.d_in for m in modules)
    return max(1, min(budget.most or budget.memory, budget.memory // per_query))


def in_chunks(queries: list, size: int, description: str, quiet: bool) -> Iterator[list]:
    """``queries`` in chunks of ``size``, with a progress bar of queries on stderr that advances as
    each chunk's answers are taken."""
    with progress_bar(description, len(queries), quiet or not queries, unit="query") as advance:
        for start in range(0, len(queries), size):
            chunk = queries[start:start + size]
            yield chunk
            advance(len(chunk))
