"""tools/row_bytes.py predicts what `attribdb info` reports of a real database's rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import make_model_folder, write_corpus
from dbtools import SMALL_SETTINGS, cli

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import row_bytes  # noqa: E402


@pytest.mark.parametrize(("width", "layers", "budget"), [(32, 2, 4096), (48, 1, 6000)])
def test_predicted_row_bytes_match_info(tmp_path, width, layers, budget):
    from attribdb.models import load_model
    from attribdb.tracking import DEFAULT_LM_PATTERNS, find_tracked_modules

    model_dir = make_model_folder(tmp_path / "model", width=width, layers=layers)
    settings = [s for s in SMALL_SETTINGS]
    settings[settings.index("--row-bytes") + 1] = str(budget)
    db = tmp_path / "db"
    cli("build", db, "--corpus", write_corpus(tmp_path / "c.jsonl", 20), "--model", model_dir, "--quiet", *settings)
    info = json.loads(cli("info", db, "--json").stdout)
    model, _ = load_model(model_dir)
    predicted = row_bytes.row_cost(find_tracked_modules(model, DEFAULT_LM_PATTERNS), budget, info["row"]["kind"])
    assert predicted.dense_bytes == info["row"]["dense_float32_bytes"]
    assert predicted.row_store_bytes == pytest.approx(info["row"]["bytes"], rel=0.02)
    assert info["row"]["bytes"] <= budget and predicted.row_store_bytes <= budget
    assert predicted.index_bytes == pytest.approx(info["bytes_per_sequence"]["faiss"], rel=0.05)
