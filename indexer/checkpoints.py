"""Which models a trajectory database holds: the checkpoints a build is given, named, stepped and weighted.

Influence through the final model of a run misses what the model has memorised (its gradients on
those documents vanish); summed over earlier checkpoints it does not (docs/evidence.md).  A build
takes the model (checkpoint 0) and further checkpoints, one by one (``--checkpoint PATH``) or as
every ``checkpoint-N/`` folder of a Hugging Face ``Trainer`` output folder (``--checkpoints-from``).

Each checkpoint's weight in the sum is 1 (``uniform``), or, as TracIn and SOURCE weigh them, the
learning rate the run trained with at its step (``lr``), read from what the Trainer saved beside it
(``trainer_state.json``) or what :func:`record` wrote there (attribdb's Trainer callback and demo
trainer do), or numbers the user gives, one per checkpoint in the order the build takes them
(``--model`` first, then each ``--checkpoint``, then ``--checkpoints-from``'s by step).  The default,
``auto``, is ``lr`` where every checkpoint records a learning rate and ``uniform`` where one does not:
on both evaluation worlds the learning-rate sum traced facts and predicted retraining better than
the uniform one (docs/evidence.md), and a run's own record is needed to weigh it so.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from attribdb.errors import ConfigError
from attribdb.manifest import Checkpoint

WEIGHTINGS = ("auto", "uniform", "lr")
TRAINER_STATE = "trainer_state.json"  # what transformers.Trainer saves in every checkpoint folder
RECORD = "attribdb_checkpoint.json"  # what attribdb.trajectory.TrajectoryCallback saves beside a model
FOLDER = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class CheckpointSpec:
    """What a build was asked for: the other checkpoints beside ``--model``, and how to weigh them."""

    paths: tuple[str, ...] = ()  # --checkpoint, in the order given
    trainer_output: str | None = None  # --checkpoints-from: every checkpoint-N/ in it, by step
    weights: str = "auto"  # auto | uniform | lr | comma-separated numbers, one per checkpoint

    def __post_init__(self):
        if self.weights not in WEIGHTINGS:
            self.given_weights()  # refused here, before any work, when they are not numbers

    def given_weights(self) -> list[float] | None:
        """The numbers given as weights, or None for a named weighting."""
        if self.weights in WEIGHTINGS:
            return None
        try:
            numbers = [float(w) for w in self.weights.split(",")]
        except ValueError:
            numbers = []
        if not numbers or not all(_usable(n) for n in numbers):
            raise ConfigError(f"checkpoint weights are {' or '.join(WEIGHTINGS)} or comma-separated numbers of at "
                              f"least 0, one per checkpoint, not {self.weights!r}")
        return numbers

    @property
    def given(self) -> bool:
        return bool(self.paths or self.trainer_output)


def trainer_checkpoints(folder: str | Path) -> list[Path]:
    """The ``checkpoint-N/`` folders of a Trainer output folder, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: --checkpoints-from takes a Trainer output folder")
    found = sorted((int(FOLDER.fullmatch(p.name).group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and FOLDER.fullmatch(p.name))
    if not found:
        raise ConfigError(f"{folder} holds no checkpoint-N folders: is it a Trainer's output_dir?")
    return [p for _, p in found]


def resolve(model: str, spec: CheckpointSpec) -> list[Checkpoint]:
    """Checkpoint 0 (``model``) and the others, each named after its folder, with its step and
    weight; [] when no other checkpoint is given (a single-model database)."""
    if not spec.given:
        return []
    model_path = Path(model).resolve()
    paths = [Path(p).resolve() for p in spec.paths]
    if spec.trainer_output:
        paths += [p.resolve() for p in trainer_checkpoints(spec.trainer_output)]
    others = [p for p in dict.fromkeys(paths) if p != model_path]  # the model may be one of the run's checkpoints
    if not others:
        raise ConfigError("the checkpoints given are all the model itself: give other checkpoints, or none")
    folders = [model_path, *others]
    given = spec.given_weights()
    if given is not None and len(given) != len(folders):
        raise ConfigError(f"{len(given)} checkpoint weights for {len(folders)} checkpoints (the model and "
                          f"{len(others)} others): give one weight per checkpoint, the model's first")
    weights = given or _weights(folders, spec.weights)
    if not any(weights):
        raise ConfigError("every checkpoint's weight is 0, so every score would be 0: give weights above 0 "
                          "(or --checkpoint-weights uniform)")
    checkpoints = [Checkpoint(name=p.name, step=_step(p), weight=weight, model_path=str(p) if i else None)
                   for i, (p, weight) in enumerate(zip(folders, weights))]
    names = [c.name for c in checkpoints]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated:
        raise ConfigError(f"two checkpoints are folders named {repeated!r}; a checkpoint is named by its folder, "
                          "so give folders of different names")
    return checkpoints


def describe(checkpoints: list[Checkpoint]) -> str:
    """One line for a build's log: each checkpoint's name, step and weight."""
    return "checkpoints (weight in the sum): " + ", ".join(
        f"{c.name}{'' if c.step is None else f' at step {c.step}'} ({c.weight:.3g})" for c in checkpoints)


def record(folder: str | Path, step: int, learning_rate: float | None) -> None:
    """Write beside a saved model what a trajectory build reads of it: its step and the learning rate
    that step trained with (``--checkpoint-weights lr``)."""
    (Path(folder) / RECORD).write_text(json.dumps({"step": step, "learning_rate": learning_rate}))


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc})") from None


def _step(folder: Path) -> int | None:
    """The checkpoint's training step: recorded by attribdb's callback or the Trainer, else its folder's N."""
    for name, key in ((RECORD, "step"), (TRAINER_STATE, "global_step")):
        recorded = _json(folder / name)
        if recorded and isinstance(recorded.get(key), int):
            return recorded[key]
    match = FOLDER.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def _weights(folders: list[Path], weighting: str) -> list[float]:
    """Each checkpoint's weight by a named weighting; ``auto`` takes the learning rates when every
    checkpoint records one and they are not all 0 (a schedule that decays to 0 gives the final model
    almost no weight, as it does in TracIn's sum)."""
    if weighting == "uniform":
        return [1.0] * len(folders)
    rates = [_learning_rate(p) for p in folders]
    if weighting == "auto":
        return rates if None not in rates and any(rates) else [1.0] * len(folders)
    missing = next((p for p, rate in zip(folders, rates) if rate is None), None)
    if missing is not None:
        raise ConfigError(f"{missing} records no learning rate (no {RECORD}, and no learning_rate logged in its "
                          f"{TRAINER_STATE}); use --checkpoint-weights uniform")
    return rates


def _learning_rate(folder: Path) -> float | None:
    """The learning rate the checkpoint's step trained with, as recorded beside it, or None."""
    recorded = _json(folder / RECORD)
    if recorded and _usable(recorded.get("learning_rate")):
        return float(recorded["learning_rate"])
    state = _json(folder / TRAINER_STATE) or {}
    step = state.get("global_step")
    logged = [e for e in state.get("log_history", []) if _usable(e.get("learning_rate"))
              and (step is None or e.get("step", 0) <= step)]
    return float(logged[-1]["learning_rate"]) if logged else None


def _usable(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
