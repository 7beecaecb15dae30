"""A database's model, tokenizer and row projection, loaded once and checked.

The build, the query engine and the exhaustive scorer all need the same
objects; loading them in one place means the model is always checked against
the manifest's fingerprint before a single gradient is computed.  The full
factors (every module's eigenbases) are loaded only when a caller needs them
(exact and exhaustive queries): the build and index queries need only the row
projection, a small fraction of their size.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from attribdb import layout
from attribdb.encoder import RowEncoder
from attribdb.factors import Factors
from attribdb.gradients import GradientRunner
from attribdb.influence import InfluenceComputer
from attribdb.manifest import Manifest
from attribdb.models import compute_dtype, deterministic_on, fingerprint, load_model, resolve_device
from attribdb.rows import RowLayout, RowProjection
from attribdb.tasks import CausalLMTask


class Runtime:
    """One checkpoint's model, factors and row projection (checkpoint 0: the database's model; a
    trajectory database has a Runtime per checkpoint, attribdb/manifest.py Checkpoint)."""

    def __init__(self, root: Path, manifest: Manifest, model: torch.nn.Module, tokenizer, device: torch.device,
                 checkpoint: int = 0):
        self.root, self.manifest, self.model, self.tokenizer, self.device = root, manifest, model, tokenizer, device
        self.checkpoint = checkpoint
        self.row_layout: RowLayout = manifest.row_layout(checkpoint)
        self.dtype = compute_dtype(manifest.settings.dtype)
        self.task = CausalLMTask(manifest.settings.module_patterns)
        self.runner = GradientRunner(model, self.task, manifest.modules, device=device, dtype=self.dtype)
        self.projection = RowProjection.load(layout.projection_path(root, checkpoint),
                                             self.row_layout).to(device, self.dtype)

    @classmethod
    def load(cls, root: str | Path, device: str | None = None, model_path: str | None = None,
             checkpoint: int = 0, manifest: Manifest | None = None) -> "Runtime":
        """``model_path`` replaces the recorded folder of checkpoint 0 (its weights must be the same);
        ``manifest``: the one already read (a trajectory's runtimes share it)."""
        root = Path(root)
        manifest = manifest or Manifest.load(root)
        resolved = resolve_device(device)
        deterministic_on(resolved)
        path = (model_path if checkpoint == 0 else None) or manifest.holder(checkpoint).model_path
        model, tokenizer = load_model(path, resolved, manifest.settings.dtype)
        manifest.require_model(fingerprint(model), checkpoint)
        manifest.check_factor_files(root, [layout.projection_path(root, checkpoint)], checkpoint)  # the factors:
        #                                                                                      when first needed
        return cls(root, manifest, model, tokenizer, resolved, checkpoint)

    @classmethod
    def load_all(cls, root: str | Path, device: str | None = None, model_path: str | None = None) -> list["Runtime"]:
        """A Runtime per checkpoint, one manifest read for all (a build encodes every row at each)."""
        manifest = Manifest.load(root)
        return [cls.load(root, device, model_path, c, manifest) for c in range(manifest.checkpoint_count)]

    @cached_property
    def computer(self) -> InfluenceComputer:
        """Full-space EK-FAC scores (exact and exhaustive modes): loads every module's factors,
        converted tensor by tensor to the device and compute dtype (one copy, no float64 beside it),
        once their sha256 matches the one the fit recorded."""
        path = layout.factors_path(self.root, self.checkpoint)
        self.manifest.check_factor_files(self.root, [path], self.checkpoint)
        factors = Factors.load(path, device=self.device, dtype=self.dtype)
        return InfluenceComputer(self.model, self.task, factors, device=self.device, dtype=self.dtype)

    def encoder(self) -> RowEncoder:
        return RowEncoder(self.runner, self.projection, self.tokenizer.pad_token_id)
