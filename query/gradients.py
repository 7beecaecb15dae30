"""A query's gradient: its tokens, its captures, its side of the row score, and its inverse-HVP on first need."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from attribdb.errors import QueryError
from attribdb.influence import inverse_hvp_self_influence
from attribdb.query.options import Query
from attribdb.runtime import Runtime
from attribdb.tasks import collate_sequences


class SolvedQueries:
    """A chunk of queries' captures and their side of the row score (attribdb/rows.py: their
    preconditioned gradients on the rows' subspaces, what stored rows are scored against), their
    sketches (what FAISS matches the rows' sketches with) and self-influence on the subspaces; the
    inverse-HVPs in the eigenbasis are computed on first need: recomputation needs them, the stored
    rows' scores do not, so a query that recomputes nothing never loads the full factors."""

    def __init__(self, runtime: Runtime, captures):
        self.runtime, self.captures = runtime, captures
        self.blocks = runtime.projection.queries(captures)
        self.sketches = runtime.projection.query_sketches(self.blocks).float()  # (Q, sketch_dim)
        self.row_self = self.blocks.self_influence().cpu().numpy()  # (Q,)

    @cached_property
    def inverse_hvp(self) -> dict[str, torch.Tensor]:
        """Per module, (Q, d_out, d_in) inverse-HVPs of the queries' gradients in the eigenbasis."""
        return self.runtime.computer.rotated_inverse_hvp(self.captures)

    def one(self, i: int) -> dict[str, torch.Tensor]:
        """Query ``i``'s inverse-HVP."""
        return {name: solved[i] for name, solved in self.inverse_hvp.items()}

    @cached_property
    def exact_self_influence(self) -> np.ndarray:
        """(Q,) the queries' uncompressed self-influence."""
        return inverse_hvp_self_influence(self.runtime.computer.factors, self.inverse_hvp).double().cpu().numpy()


class QueryGradients:
    """Turns queries into solved gradients with the database's model."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.max_tokens = getattr(runtime.model.config, "max_position_embeddings", None) or 1 << 30

    def tokenize(self, query: Query) -> tuple[list[int], int]:
        """The query's token ids and where its completion starts (the tokens that are scored)."""
        if not query.completion.strip():
            raise QueryError("the completion is empty: give the text whose likelihood you want explained")
        tokenizer = self.runtime.tokenizer
        prompt_ids = tokenizer(query.prompt, add_special_tokens=False)["input_ids"]
        if not prompt_ids:  # something must predict the first completion token
            prompt_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        completion_ids = tokenizer(query.completion, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + completion_ids
        if len(ids) > self.max_tokens:
            raise QueryError(f"the query is {len(ids)} tokens long; the model takes at most {self.max_tokens}")
        return ids, len(prompt_ids)

    def solve(self, queries: list[Query]) -> SolvedQueries:
        tokenized = [self.tokenize(q) for q in queries]
        batch = collate_sequences([ids for ids, _ in tokenized], self.runtime.tokenizer.pad_token_id,
                                  score_from=[start for _, start in tokenized])
        return SolvedQueries(self.runtime, self.runtime.runner.measurement_captures(batch)[0])
