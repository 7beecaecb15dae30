"""A ``transformers.Trainer`` callback that keeps what a trajectory database needs from a training run.

Influence through the final model of a run misses the documents the model has memorised; summed
over checkpoints of the run it does not (docs/evidence.md).  A Trainer's own ``checkpoint-N/``
folders hold optimizer and scheduler states beside the model (three times its size with Adam) and
are rotated away by ``save_total_limit``; what attribdb needs is the model and its tokenizer at a
few steps chosen in advance, and the learning rate the run trained with there (TracIn and SOURCE
weigh checkpoints by it).  :class:`TrajectoryCallback` saves exactly that::

    trainer = Trainer(model, args, train_dataset=..., processing_class=tokenizer,
                      callbacks=[TrajectoryCallback("run/trajectory", steps=[200, 400, 800])])
    trainer.train()  # run/trajectory/checkpoint-{200,400,800}/ and, at the end, checkpoint-<last step>/
    # attribdb build db --corpus corpus.jsonl --model run/trajectory/checkpoint-1000 \
    #     --checkpoints-from run/trajectory --checkpoint-weights lr

Each save is written to a temporary folder and renamed into place, so a run killed while saving
leaves no half-written checkpoint; a step already saved (a resumed run) is not saved again.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from transformers import TrainerCallback

from attribdb.errors import ConfigError
from attribdb.indexer.checkpoints import record


class TrajectoryCallback(TrainerCallback):
    """Save the model, its tokenizer and the learning rate as ``folder/checkpoint-N/`` at the steps
    ``steps``, every ``every`` steps and (``final``) at the end of training, for
    ``attribdb build --checkpoints-from folder``.  The learning rate is the one step N trained
    with, as the Trainer logs it."""

    def __init__(self, folder: str | Path, steps: Iterable[int] = (), every: int | None = None, final: bool = True):
        steps = frozenset(steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise ConfigError(f"steps are training steps, whole numbers of at least 1, not {sorted(steps, key=str)}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"every is a number of steps of at least 1, not {every!r}")
        if not steps and every is None and not final:
            raise ConfigError("choose the steps to save: give steps, every or final")
        self.folder, self.steps, self.every, self.final = Path(folder), steps, every, final
        self.learning_rate: float | None = None  # the one the current step trains with

    def wanted(self, step: int) -> bool:
        return step in self.steps or (self.every is not None and step % self.every == 0)

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        """Before the scheduler moves on: the learning rate this step trained with."""
        self.learning_rate = float(lr_scheduler.get_last_lr()[0]) if lr_scheduler is not None else None

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """After step ``state.global_step``: the weights a checkpoint of that step holds."""
        if state.is_world_process_zero and self.wanted(state.global_step):
            self.save(state.global_step, model, processing_class, self.learning_rate)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """The trained model, the database's model (``--model``), when ``final``."""
        if state.is_world_process_zero and self.final and state.global_step:
            self.save(state.global_step, model, processing_class, self.learning_rate)

    def save(self, step: int, model, tokenizer, learning_rate: float | None) -> Path:
        """``model`` and ``tokenizer`` as ``checkpoint-<step>/``, with the step and learning rate."""
        final = self.folder / f"checkpoint-{step}"
        if final.is_dir():
            return final
        if tokenizer is None:
            raise ConfigError("the Trainer has no tokenizer (processing_class): a checkpoint attribdb reads needs "
                              "one beside the model")
        made = self.folder / f".checkpoint-{step}.{os.getpid()}.tmp"
        shutil.rmtree(made, ignore_errors=True)
        model.save_pretrained(made)
        tokenizer.save_pretrained(made)
        record(made, step, learning_rate)
        os.replace(made, final)
        return final

