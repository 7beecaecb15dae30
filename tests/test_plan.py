"""`attribdb plan` predicts what `attribdb info` reports of a real database's rows, all-in, before it is built."""

from __future__ import annotations

import json

import pytest

from conftest import make_model_folder, write_corpus
from dbtools import SMALL_SETTINGS, cli, cli_here


@pytest.mark.slow
@pytest.mark.parametrize(("width", "layers", "budget", "index_kind"), [(32, 2, 4096, "pq4"), (48, 1, 6000, "auto")])
def test_plan_of_a_model_folder_matches_info_of_its_database(tmp_path, width, layers, budget, index_kind):
    """The all-in cost a plan prints is what info reports once the database is built, to the byte,
    within the budget; and what lies on disk per row."""
    from attribdb import api

    model_dir = make_model_folder(tmp_path / "model", width=width, layers=layers)
    settings = list(SMALL_SETTINGS)
    settings[settings.index("--row-bytes") + 1] = str(budget)
    max_length = int(settings[settings.index("--max-length") + 1])
    [plan] = api.plan(model_dir, row_bytes=budget, max_length=max_length)  # before the build: no database yet
    db = tmp_path / "db"
    cli("build", db, "--corpus", write_corpus(tmp_path / "c.jsonl", 60), "--model", model_dir, "--quiet",
        *settings, "--index-kind", index_kind)
    info = json.loads(cli("info", db, "--json").stdout)
    assert plan.dense_bytes == info["row"]["dense_float32_bytes"]
    predicted, built = plan.cost.to_dict(), info["row"]["all_in"]
    assert predicted == built
    assert built["total"] <= budget and budget - built["total"] < 16
    assert built["row_store"] == info["row"]["bytes"]
    per_row = info["bytes_per_sequence"]
    # each row once in the row store, with its CRC32C and its (offset, length) in its file's index, and the
    # arrays' metadata shared by the 32 rows of a shard
    assert built["row_store"] < per_row["zarr"] < built["row_store"] + 128
    if index_kind == "pq4":  # the codes, and the quantizers trained once, shared by every row
        assert built["codes"] <= per_row["faiss"] < 2 * built["codes"]
    else:
        assert info["database_index"] is None and per_row["faiss"] == 0


def test_plan_command_prices_named_shapes_and_refuses_bad_settings(tmp_path):
    out = cli_here("plan", "--shape", "gpt2-small", "--rows", "1000", "--row-bytes", "8192").stdout
    line = next(line for line in out.splitlines() if line.startswith("gpt2-small"))
    columns = line.split()
    assert columns[1] == "48", "12 blocks × 4 linear layers are tracked"
    row_store, codes, metadata, total = (float(c.removesuffix("Ki")) for c in columns[3:7])
    assert metadata == 2.0, "16 bytes per token of the default max-length, 128"
    assert 7.9 < total <= 8.0 and total == pytest.approx(row_store + codes + metadata, abs=0.15), \
        "the row fills the 8 KiB all-in budget, never more"
    database = columns[7]
    assert database.endswith("Mi") and float(database.removesuffix("Mi")) == pytest.approx(total * 1000 / 1024,
                                                                                            rel=0.02)
    bad = cli("plan", "--row-bytes", "0", check=False)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("Error: row-bytes must be positive")
    assert "Traceback" not in bad.stderr
    tight = cli("plan", "--shape", "gpt2-small", "--row-bytes", "2000", check=False)
    assert tight.returncode == 1 and "leaves no room for a row" in tight.stderr
    assert len(tight.stderr.strip().splitlines()) == 1


def test_the_default_row_costs_at_most_32_kib_all_in_at_gpt2_small():
    from attribdb import api

    [plan] = api.plan(shape="gpt2-small")
    assert plan.row_bytes == 32768 and 31 * 1024 < plan.cost.total <= 32 * 1024
