"""Turn token sequences into stored rows: Ĝ per module, compressed.

The build and the tests share this one path from token ids to
:class:`~attribdb.shard.RowBlock`, so what is stored is exactly what the
exhaustive scorer would compute, then compressed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from attribdb.compression import LowRank, Sketcher, low_rank
from attribdb.influence import InfluenceComputer, Preconditioned, self_influence
from attribdb.shard import RowBlock, RowLayout
from attribdb.tasks import collate_sequences


class RowEncoder:
    def __init__(self, computer: InfluenceComputer, sketcher: Sketcher, row_layout: RowLayout, pad_id: int):
        self.computer, self.sketcher, self.layout, self.pad_id = computer, sketcher, row_layout, pad_id

    def preconditioned(self, token_ids: Sequence[Sequence[int]]) -> Preconditioned:
        batch = collate_sequences([list(ids) for ids in token_ids], self.pad_id)
        return self.computer.train_preconditioned(batch)

    def encode(self, token_ids: Sequence[Sequence[int]], metadata: list[dict], batch_size: int) -> RowBlock:
        """Rows for ``token_ids`` in batches of ``batch_size`` forward/backward passes.

        Batches are formed from sequences of similar length (a document's last
        window is usually short, and a batch pads to its longest sequence), then
        the rows are put back in their order; a block is always batched the same
        way, so a resumed build computes exactly what an uninterrupted one did.
        """
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
        parts = []
        for start in range(0, len(order), batch_size):
            parts.append(self._encode_batch([token_ids[i] for i in order[start:start + batch_size]]))
        restore = np.argsort(order)
        arrays = {key: np.concatenate([p[key] for p in parts])[restore] for key in parts[0]}
        return RowBlock(metadata=metadata, **arrays)

    def _encode_batch(self, token_ids) -> dict[str, np.ndarray]:
        pre = self.preconditioned(token_ids)
        heads, tails = [], []
        for m in self.layout.modules:
            head, tail = low_rank(pre[m.name], self.layout.rank + self.layout.tail_rank).split(self.layout.rank)
            heads.append(head)
            tails.append(tail)
        rows = {
            "lowrank": _packed(heads),
            "sigma": torch.stack([h.sigma for h in heads], dim=1).cpu().numpy(),
            "energy": torch.stack([h.energy for h in heads], dim=1).cpu().numpy(),
            "sketch": self.sketcher.sketch(pre).cpu().numpy(),
            "self_influence": self_influence(pre).float().cpu().numpy(),
        }
        if self.layout.tail_rank:
            rows["tail"] = _packed(tails)
            rows["tail_sigma"] = torch.stack([t.sigma for t in tails], dim=1).cpu().numpy()
        return rows


def _packed(factors: list[LowRank]) -> np.ndarray:
    """Rows of U then V per module, in module order: the RowLayout packing."""
    n = factors[0].u.shape[0]
    return torch.cat([part.reshape(n, -1) for f in factors for part in (f.u, f.v)], dim=1).cpu().numpy()
