"""Bytes per row, and per 10⁶ rows, at real model shapes: from the code that lays out a row.

For each shape the tracked modules come from the Hugging Face architecture
built on the meta device (no weights, no download); the row is laid out by
:func:`attribdb.rows.layout_from_weights`, the function a fit uses, at the
default ``--row-bytes`` and ``--row-kind``.  The layout needs only each
coordinate's expected share Λ/(Λ+λ); without a fitted model the tool uses a
power-law spectrum (Λ_ij ∝ (i·j)^-1.5, λ = 0.1 · mean Λ, as the default
damping).  The bytes hardly depend on it: a layout fills the budget up to
rounding, whatever the spectrum.  tests/test_row_bytes.py checks these
figures against `attribdb info` of real databases on two tiny shapes.

Run: python tools/row_bytes.py [--row-bytes N]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class RowCost:
    modules: int
    dense_bytes: int  # the float32 Ĝ of every tracked module
    row_store_bytes: int  # Zarr: the float16 row and its float32 squared norm
    index_bytes: int  # FAISS flat index: the float16 row again

    @property
    def total(self) -> int:
        return self.row_store_bytes + self.index_bytes


SHAPES = {
    "GPT-2 small": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12)),
    "Pythia-410M": ("gpt_neox", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096)),
    "Pythia-1.4B": ("gpt_neox", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=8192)),
    "Llama-2-7B": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 intermediate_size=11008)),
}


def tracked_modules(model_type: str, **config):
    """The modules a database would track, from the architecture alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from attribdb.tracking import DEFAULT_LM_PATTERNS, find_tracked_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=1024, **config))
    return find_tracked_modules(model, DEFAULT_LM_PATTERNS)


def power_law_weights(module):
    import torch

    out = torch.arange(1, module.d_out + 1, dtype=torch.float32) ** -1.5
    inp = torch.arange(1, module.d_in + 1, dtype=torch.float32) ** -1.5
    spectrum = torch.outer(out, inp)
    return spectrum / (spectrum + 0.1 * spectrum.mean())


def row_cost(modules, row_bytes: int, kind: str) -> RowCost:
    from attribdb.rows import index_dim, layout_from_weights

    row = layout_from_weights(kind, modules, power_law_weights, row_bytes)
    return RowCost(len(modules), row.dense_bytes_per_row, row.bytes_per_row, 2 * index_dim(row.dim))


def main() -> None:
    from attribdb.settings import DatabaseSettings

    defaults = DatabaseSettings(model_path="-")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row-bytes", type=int, default=defaults.row_bytes)
    parser.add_argument("--row-kind", default=defaults.row_kind)
    args = parser.parse_args()
    print(f"{args.row_kind} rows of at most {args.row_bytes} bytes (--row-bytes; default {defaults.row_bytes})")
    print(f"{'shape':<13} {'modules':>7} {'dense Ĝ':>10} {'row store':>10} {'+ FAISS':>10} {'per 10⁶ rows':>13}")
    for name, (model_type, config) in SHAPES.items():
        cost = row_cost(tracked_modules(model_type, **config), args.row_bytes, args.row_kind)
        print(f"{name:<13} {cost.modules:>7} {cost.dense_bytes / 2**20:>8.0f}Mi {cost.row_store_bytes / 1024:>8.1f}Ki "
              f"{cost.total / 1024:>8.1f}Ki {cost.total * 1e6 / 2**30:>11.1f}Gi")
    print("per row besides: its LMDB record (text, token ids, spans), about the size of the text and tokens")


if __name__ == "__main__":
    main()
