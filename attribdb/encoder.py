"""Turn token sequences into stored rows, in the batches the build and the tests share.

One path from token ids to :class:`~attribdb.shard.RowBlock`: a forward and a
backward pass for the tracked layers' captures, then the row projection
(:mod:`attribdb.rows`).  The full per-sequence gradient is never formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attribdb.gradients import GradientRunner
from attribdb.records import RowRecord
from attribdb.rows import EncodedRows, RowProjection
from attribdb.shard import RowBlock
from attribdb.tasks import collate_sequences


class RowEncoder:
    def __init__(self, runner: GradientRunner, projection: RowProjection, pad_id: int):
        """``projection`` on the runner's device and in its dtype."""
        self.runner, self.projection, self.pad_id = runner, projection, pad_id

    def rows(self, token_ids: Sequence[Sequence[int]]) -> EncodedRows:
        """Rows of the sequences' training loss."""
        batch = collate_sequences([list(ids) for ids in token_ids], self.pad_id)
        return self.projection.encode(self.runner.train_captures(batch)[0])

    def encode(self, token_ids: Sequence[Sequence[int]], metadata: list[RowRecord], batch_size: int) -> RowBlock:
        """Rows for ``token_ids`` in batches of ``batch_size`` forward/backward passes.

        Batches are formed from sequences of similar length (a document's last
        window is usually short, and a batch pads to its longest sequence), then
        the rows are put back in their order; a block is always batched the same
        way, so a resumed build computes exactly what an uninterrupted one did.
        """
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
        parts = [self.rows([token_ids[i] for i in order[start:start + batch_size]])
                 for start in range(0, len(order), batch_size)]
        restore = np.argsort(order)
        rows = np.concatenate([part.payloads for part in parts])[restore]
        self_influence = np.concatenate([part.self_influence for part in parts])[restore]
        return RowBlock(rows=rows, self_influence=self_influence, metadata=metadata)
