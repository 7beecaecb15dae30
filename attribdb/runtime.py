"""A database's model, tokenizer, factors and sketch, loaded once and checked.

The build, the query engine and the exhaustive scorer all need the same
objects; loading them in one place means the model is always checked against
the manifest's fingerprint before a single gradient is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from attribdb import layout
from attribdb.compression import Sketcher
from attribdb.encoder import RowEncoder
from attribdb.factors import Factors
from attribdb.influence import InfluenceComputer
from attribdb.manifest import Manifest
from attribdb.models import compute_dtype, fingerprint, load_model, resolve_device
from attribdb.shard import RowLayout
from attribdb.tasks import CausalLMTask


def load_sketcher(root: Path, manifest: Manifest) -> Sketcher:
    return Sketcher.load(layout.sketch_path(root), manifest.modules)


@dataclass
class Runtime:
    root: Path
    manifest: Manifest
    model: torch.nn.Module
    tokenizer: object
    task: CausalLMTask
    factors: Factors
    computer: InfluenceComputer
    sketcher: Sketcher
    row_layout: RowLayout
    device: torch.device

    @classmethod
    def load(cls, root: str | Path, device: str | None = None, model_path: str | None = None) -> "Runtime":
        root = Path(root)
        manifest = Manifest.load(root)
        resolved = resolve_device(device)
        model, tokenizer = load_model(model_path or manifest.settings.model_path, resolved, manifest.settings.dtype)
        manifest.require_model(fingerprint(model))
        manifest.check_factor_files(root)
        factors = Factors.load(layout.factors_path(root))
        computer = InfluenceComputer(model, CausalLMTask(manifest.settings.module_patterns), factors,
                                     device=resolved, dtype=compute_dtype(manifest.settings.dtype))
        return cls(root, manifest, model, tokenizer, computer.runner.task, factors, computer,
                   load_sketcher(root, manifest), manifest.row_layout(), resolved)

    def encoder(self) -> RowEncoder:
        return RowEncoder(self.computer, self.sketcher, self.row_layout, self.tokenizer.pad_token_id)
