"""What a database will cost before it is built: bytes per row all-in and per N rows, for a model.

The tracked modules come from the model's architecture built on the meta
device (its ``config.json`` only: no weights are read, nothing is downloaded).
Every part of a row's cost is fixed by ``--row-bytes`` and ``--max-length``
(attribdb/row_costs.py): the payload of a row is the same size whatever the
model, its factors or its data, so the plan is what ``attribdb info`` of the
built database prints, to the byte (the tests check it on real databases).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from attribdb.errors import ConfigError
from attribdb.row_costs import RowCost, planned_cost

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Shapes a user can plan for without a model folder, named as the models they copy.
SHAPES = {
    "gpt2-small": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12)),
    "pythia-410m": ("gpt_neox", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096)),
    "pythia-1.4b": ("gpt_neox", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=8192)),
    "llama-2-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 intermediate_size=11008)),
}


@dataclass(frozen=True)
class Plan:
    label: str  # the model folder or shape name
    row_bytes: int  # the --row-bytes budget, all-in
    max_length: int  # tokens per sequence: what the metadata estimate is made for
    modules: int
    dense_bytes: int  # the float32 Ĝ of every tracked module, what an uncompressed row would be
    cost: RowCost  # what a sequence costs, by where it lies
    checkpoints: int = 1  # models whose rows a sequence has (a trajectory database: attribdb/row_costs.py)

    def database_bytes(self, rows: int) -> int:
        return self.cost.total * rows


def _modules_from_config(config):
    import torch
    from transformers import AutoModelForCausalLM

    from attribdb.tracking import DEFAULT_LM_PATTERNS, find_tracked_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return find_tracked_modules(model, DEFAULT_LM_PATTERNS)


def modules_of_folder(folder: str | Path):
    """The modules a database of this local model folder would track."""
    from transformers import AutoConfig

    from attribdb.models import quiet_transformers

    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"{folder} is not a local model folder (no config.json)")
    quiet_transformers()  # a shape's stand-in vocabulary makes it warn about token ids
    return _modules_from_config(AutoConfig.from_pretrained(folder, local_files_only=True))


def modules_of_shape(name: str):
    """The modules a database of a model of this named shape would track."""
    from transformers import AutoConfig

    from attribdb.models import quiet_transformers

    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}, or give --model")
    model_type, config = SHAPES[name]
    quiet_transformers()
    return _modules_from_config(AutoConfig.for_model(model_type, vocab_size=1024, **config))


def _plan(label: str, modules, settings, checkpoints: int) -> Plan:
    return Plan(label, settings.row_bytes, settings.max_length, len(modules),
                4 * sum(m.d_out * m.d_in for m in modules),
                planned_cost(settings.row_bytes, settings.max_length, checkpoints), checkpoints)


def plan(model: str | Path | None = None, shape: str | None = None, row_bytes: int | None = None,
         max_length: int | None = None, checkpoints: int = 1) -> list[Plan]:
    """The cost of a row for a model folder, a named shape, or (given neither) every named shape,
    at the settings a new database would get (a model folder's default max-length is clamped to
    its context, as a build does); ``checkpoints``: the models of a trajectory database."""
    from attribdb.models import context_of_folder
    from attribdb.settings import DatabaseSettings

    given = {key: value for key, value in (("row_bytes", row_bytes), ("max_length", max_length)) if value is not None}
    settings = DatabaseSettings(model_path="-", **given)  # refuses a bad budget as a build would
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
        raise ConfigError(f"checkpoints must be a whole number of at least 1, not {checkpoints!r}")
    if model is not None and shape is not None:
        raise ConfigError("give a model folder or a shape, not both")
    if model is not None:
        context = context_of_folder(model)
        if max_length is None and context is not None and settings.max_length > context:
            settings = dataclasses.replace(settings, max_length=context)
        return [_plan(str(model), modules_of_folder(model), settings, checkpoints)]
    return [_plan(name, modules_of_shape(name), settings, checkpoints) for name in ([shape] if shape else SHAPES)]
