"""`attribdb plan` predicts what `attribdb info` reports of a real database's rows, before it is built."""

from __future__ import annotations

import json

import pytest

from conftest import make_model_folder, write_corpus
from dbtools import SMALL_SETTINGS, cli, cli_here


@pytest.mark.slow
@pytest.mark.parametrize(("width", "layers", "budget"), [(32, 2, 4096), (48, 1, 6000)])
def test_plan_of_a_model_folder_matches_info_of_its_database(tmp_path, width, layers, budget):
    from attribdb import api

    model_dir = make_model_folder(tmp_path / "model", width=width, layers=layers)
    settings = list(SMALL_SETTINGS)
    settings[settings.index("--row-bytes") + 1] = str(budget)
    [plan] = api.plan(model_dir, row_bytes=budget)  # before the build: no database yet
    db = tmp_path / "db"
    cli("build", db, "--corpus", write_corpus(tmp_path / "c.jsonl", 20), "--model", model_dir, "--quiet", *settings)
    info = json.loads(cli("info", db, "--json").stdout)
    assert plan.row_kind == info["row"]["kind"]
    predicted = plan.cost
    assert predicted.dense_bytes == info["row"]["dense_float32_bytes"]
    assert predicted.row_store_bytes == pytest.approx(info["row"]["bytes"], rel=0.02)
    assert info["row"]["bytes"] <= budget and predicted.row_store_bytes <= budget
    assert predicted.index_bytes == pytest.approx(info["bytes_per_sequence"]["faiss"], rel=0.05)


def test_plan_command_prices_named_shapes_and_refuses_bad_settings(tmp_path):
    out = cli_here("plan", "--shape", "gpt2-small", "--rows", "1000", "--row-bytes", "8192").stdout
    line = next(line for line in out.splitlines() if line.startswith("gpt2-small"))
    assert line.split()[1] == "48", "12 blocks × 4 linear layers are tracked"
    row_store_kib = float(line.split()[3].removesuffix("Ki"))
    assert 7.0 < row_store_kib <= 8.0, "the layout fills most of the 8 KiB budget, never more"
    total_kib, database = float(line.split()[4].removesuffix("Ki")), line.split()[5]
    assert database.endswith("Mi")
    assert float(database.removesuffix("Mi")) == pytest.approx(total_kib * 1000 / 1024, rel=0.01)
    bad = cli_here("plan", "--row-kind", "dense")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("Error: unknown row kind")
    assert "Traceback" not in bad.stderr
