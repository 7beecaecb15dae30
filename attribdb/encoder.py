"""Turn token sequences into stored rows: Ĝ per module, compressed.

The build and the tests share this one path from token ids to
:class:`~attribdb.shard.RowBlock`, so what is stored is exactly what the
exhaustive scorer would compute, then compressed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from attribdb.compression import Sketcher, low_rank
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
        """Rows for ``token_ids`` in batches of ``batch_size`` forward/backward passes."""
        parts = []
        for start in range(0, len(token_ids), batch_size):
            parts.append(self._encode_batch(token_ids[start:start + batch_size]))
        arrays = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        return RowBlock(metadata=metadata, **arrays)

    def _encode_batch(self, token_ids) -> dict[str, np.ndarray]:
        pre = self.preconditioned(token_ids)
        lowrank_parts, sigmas, energies = [], [], []
        for m in self.layout.modules:
            factors = low_rank(pre[m.name], self.layout.rank)
            n = factors.u.shape[0]
            lowrank_parts += [factors.u.reshape(n, -1), factors.v.reshape(n, -1)]
            sigmas.append(factors.sigma)
            energies.append(factors.energy)
        return {
            "lowrank": torch.cat(lowrank_parts, dim=1).cpu().numpy(),
            "sigma": torch.stack(sigmas, dim=1).cpu().numpy(),
            "energy": torch.stack(energies, dim=1).cpu().numpy(),
            "sketch": self.sketcher.sketch(pre).cpu().numpy(),
            "self_influence": self_influence(pre).float().cpu().numpy(),
        }
