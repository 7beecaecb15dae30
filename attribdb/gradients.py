"""One forward and one backward pass over a batch, with the tracked layers' captures.

Every consumer (factor fitting, the exhaustive scorer, the index build, query
gradients, exact rescoring) goes through :class:`GradientRunner`, so padding,
devices and dtypes are handled in one place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attribdb.tasks import Task
from attribdb.tracking import Capture, ModuleTracker, TrackedModule


class GradientRunner:
    """Runs a task's loss through a model and returns per-module captures.

    The model is put in eval mode: dropout would make every gradient random.
    """

    def __init__(self, model: nn.Module, task: Task, modules: list[TrackedModule], *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 autocast: torch.dtype | None = None):
        self.model = model.eval()
        self.autocast = autocast  # the forward pass under torch.autocast in this dtype (a low-precision fit)
        self.task = task
        self.modules = list(modules)
        self.device = torch.device(device)
        self.dtype = dtype

    def train_captures(self, batch: Any, sample: bool = False,
                       generator: torch.Generator | None = None) -> tuple[dict[str, Capture], torch.Tensor | None]:
        """Captures of the training loss (model-sampled labels when ``sample``)."""
        return self._run(batch, lambda b: self.task.train_loss(self.model, b, sample=sample, generator=generator))

    def measurement_captures(self, batch: Any) -> tuple[dict[str, Capture], torch.Tensor | None]:
        """Captures of the query measurement."""
        return self._run(batch, lambda b: self.task.measurement(self.model, b))

    def _run(self, batch, loss_fn):
        batch = self.task.to_device(batch, self.device)
        mask = self.task.token_mask(batch)
        with ModuleTracker(self.model, self.modules, dtype=self.dtype) as tracker, torch.enable_grad():
            tracker.reset(mask)
            with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                enabled=self.autocast is not None):
                loss = loss_fn(batch)
            captures = tracker.backward(loss)
        return captures, mask
