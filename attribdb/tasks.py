"""Tasks: how to compute a model's training loss and query measurement.

Influence needs two scalar functions of a batch: the *training loss* (whose
per-sequence gradients are stored) and the *measurement* of a query (whose
gradient is matched against them).  Both are returned summed over the batch:
examples do not interact, so one backward pass of the sum yields each
example's own gradient at the tracked layers.

For the true Fisher the training loss is evaluated on labels *sampled from the
model's own predictive distribution* (``sample=True``), which is what makes the
Fisher a Gauss-Newton approximation of the Hessian.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attribdb.tracking import DEFAULT_LM_PATTERNS

IGNORE_INDEX = -100  # label of positions that are not scored (prompt, padding)


class Task(ABC):
    """What attribdb must know about a model; implement it for any ``nn.Module``.

    A batch is whatever the task's methods accept; the default helpers expect a
    ``(inputs, targets)`` tuple of tensors.
    """

    #: fnmatch patterns of the modules to track; None tracks every nn.Linear
    module_patterns: tuple[str, ...] | None = None

    @abstractmethod
    def train_loss(self, model: nn.Module, batch: Any, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Training loss summed over the batch; with ``sample`` on model-sampled labels."""

    @abstractmethod
    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The query quantity whose change we attribute, summed over the batch."""

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        """(B, T) mask of real tokens for sequence models; None when inputs are (B, d)."""
        return None

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return tuple(x.to(device) for x in batch)


class ClassificationTask(Task):
    """Cross-entropy on ``(inputs, class_ids)``; measurement = the example's loss."""

    def train_loss(self, model, batch, sample=False, generator=None):
        inputs, targets = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                probs = torch.softmax(logits.detach().double(), dim=-1)
                targets = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return F.cross_entropy(logits, targets, reduction="sum")

    def measurement(self, model, batch):
        return self.train_loss(model, batch)


class RegressionTask(Task):
    """Half squared error on ``(inputs, targets)``; its Fisher samples y ~ N(f(x), 1)."""

    def train_loss(self, model, batch, sample=False, generator=None):
        inputs, targets = batch
        preds = model(inputs)
        if sample:
            with torch.no_grad():
                noise = torch.randn(preds.shape, generator=generator, device=preds.device, dtype=preds.dtype)
                targets = preds.detach() + noise
        return 0.5 * ((preds - targets.reshape(preds.shape)) ** 2).sum()

    def measurement(self, model, batch):
        return self.train_loss(model, batch)


class CausalLMTask(Task):
    """Any Hugging Face causal LM.

    Batch: ``{"input_ids", "attention_mask", "labels"}`` (B, T) tensors with
    ``labels`` equal to ``input_ids`` where a token is scored and
    :data:`IGNORE_INDEX` elsewhere.  Training sequences score every real token;
    a query scores only its completion, so the measurement is the summed
    negative log-likelihood of the completion given the prompt.
    """

    module_patterns = DEFAULT_LM_PATTERNS

    def __init__(self, module_patterns: tuple[str, ...] | None = None):
        if module_patterns is not None:
            self.module_patterns = tuple(module_patterns)

    def _token_nll(self, model, batch, sample, generator) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1]  # position t predicts token t + 1
        labels = batch["labels"][:, 1:]
        if sample:
            with torch.no_grad():
                probs = torch.softmax(logits.detach().double(), dim=-1).reshape(-1, logits.shape[-1])
                drawn = torch.multinomial(probs, 1, generator=generator).reshape(labels.shape)
                labels = torch.where(labels == IGNORE_INDEX, labels, drawn)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="none").reshape(labels.shape)

    def train_loss(self, model, batch, sample=False, generator=None):
        return self._token_nll(model, batch, sample, generator).sum()

    def measurement(self, model, batch):
        return self._token_nll(model, batch, False, None).sum()

    def token_losses(self, model, batch) -> torch.Tensor:
        """Per-position NLL (B, T-1) of the scored tokens, 0 elsewhere."""
        return self._token_nll(model, batch, False, None)

    def token_mask(self, batch):
        return batch["attention_mask"]

    def batch_size(self, batch):
        return batch["input_ids"].shape[0]

    def to_device(self, batch, device):
        return {key: value.to(device) for key, value in batch.items()}


def collate_sequences(token_ids: list[list[int]], pad_id: int,
                      score_from: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token lists into a causal-LM batch.

    ``score_from[i]`` is the first scored position of sequence i (the start of
    the completion for a query); by default every token is scored.  The first
    token is never a target: nothing predicts it.
    """
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    labels = torch.full((len(token_ids), longest), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(token_ids):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        start = max(1, score_from[row] if score_from is not None else 1)
        labels[row, start:n] = input_ids[row, start:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
