"""The query engine against the exhaustive ground truth, and its CLI, shell and formats."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import attribdb.api as api
from attribdb.errors import ModelMismatchError, QueryError, StoreError

from conftest import write_corpus
from dbtools import SMALL_SETTINGS, assert_within_energy_bound, cli, rewrite_manifest

QUERIES = [
    {"prompt": "the cat sat near the", "completion": " river stone"},
    {"prompt": "a bird flew over", "completion": " the old house"},
    {"prompt": "red blue green", "completion": " small large quick"},
    {"prompt": "north south", "completion": " east west city"},
]


@pytest.fixture(scope="module")
def db_path(tmp_path_factory, model_dir) -> Path:
    root = tmp_path_factory.mktemp("qdb")
    corpus = write_corpus(root / "corpus.jsonl", 150, seed=5)
    db = root / "db"
    settings = [s for s in SMALL_SETTINGS]
    settings[settings.index("--sketch-size") + 1] = "256"
    # rank 4 for every candidate, 8 more triplets for the best: 12 of the 16 a 16-token sequence can have
    cli("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *settings, "--tail-rank", "8")
    return db


@pytest.fixture(scope="module")
def db(db_path):
    with api.open(db_path) as database:
        yield database


@pytest.fixture(scope="module")
def ground_truth(db):
    return db.exhaustive(QUERIES, k=10)


def _ids(hits):
    return [(h.shard, h.row) for h in hits]


@pytest.mark.parametrize("rank_by", ["normalized", "score"])
def test_index_answers_agree_with_exhaustive(db, rank_by):
    truths = db.exhaustive(QUERIES, k=10, rank_by=rank_by)
    results = db.query_batch(QUERIES, k=10, candidates=64, rank_by=rank_by)
    recalls = [len(set(_ids(r.hits)) & set(_ids(t.hits))) / 10 for r, t in zip(results, truths)]
    assert sum(recalls) / len(recalls) >= 0.9, recalls
    field = "score" if rank_by == "score" else "normalized_score"
    for result, truth in zip(results, truths):
        keys = [getattr(h, field) for h in result.hits]
        assert keys == sorted(keys, reverse=True)
        assert all(h.score <= 0 for h in result.opponents)
        top = {(h.shard, h.row): h.score for h in truth.hits}
        for hit in result.hits:  # low-rank rescoring is close to the exact score of the same row
            if (hit.shard, hit.row) in top:
                assert hit.score == pytest.approx(top[(hit.shard, hit.row)], rel=0.05, abs=1e-3 * abs(truth.hits[0].score))


def test_tail_triplets_bring_the_top_scores_closer_to_exhaustive(db, ground_truth):
    truths = [{(h.shard, h.row): h.score for h in t.hits} for t in db.exhaustive(QUERIES, k=10_000)]
    errors = {}
    for rerank in (0, None):
        results = db.query_batch(QUERIES, k=10, candidates=64, rerank=rerank)
        errors[rerank] = sum(abs(h.score - truth[(h.shard, h.row)]) for r, truth in zip(results, truths) for h in r.hits)
    assert errors[None] < 0.5 * errors[0], errors


def test_head_and_tail_factors_reproduce_scores_within_their_energy(db):
    import numpy as np
    import torch

    from attribdb import layout
    from attribdb.compression import low_rank_scores

    runtime = db.engine.runtime
    reader = next(iter(db.engine.shards.values()))
    rows = np.arange(min(12, reader.rows))
    train = runtime.encoder().preconditioned([m["token_ids"] for m in reader.metadata(rows)])
    query = db.engine.preconditioned([api._as_query(QUERIES[0])])
    parts = {name: (torch.from_numpy(reader.read(name, rows)), torch.from_numpy(reader.read(sigma, rows)), lay)
             for name, sigma, lay in ((layout.LOWRANK, layout.SIGMA, runtime.row_layout),
                                      (layout.TAIL, layout.TAIL_SIGMA, runtime.row_layout.tail))}
    energy_head = torch.from_numpy(reader.read(layout.ENERGY, rows)).double()
    for j, m in enumerate(runtime.manifest.modules):
        approx = 0
        for packed, sigma, lay in parts.values():
            u, v = lay.unpack(packed, m.name)
            approx = approx + low_rank_scores(query[m.name], u, v, sigma[:, j])[0].double()
        head_sq = (parts[layout.LOWRANK][1][:, j].double() ** 2).sum(1)
        all_sq = head_sq + (parts[layout.TAIL][1][:, j].double() ** 2).sum(1)
        energy = torch.where(head_sq > 0, energy_head[:, j] * all_sq / head_sq.clamp_min(1e-300), 1.0).clamp(max=1)
        true = torch.einsum("oi,noi->n", query[m.name][0], train[m.name]).double()
        norms = query[m.name][0].norm().double() * train[m.name].flatten(1).norm(dim=1).double()
        assert_within_energy_bound(approx, true, norms, energy, m.name)


def test_faiss_holds_each_sketch_divided_by_its_gradient_norm(db):
    """So that candidates come by direction: a raw sketch's error grows with its row's norm."""
    import numpy as np

    from attribdb import layout

    for shard_id, reader in db.engine.shards.items():
        sketch, self_influence = reader.read(layout.SKETCH), reader.read(layout.SELF_INFLUENCE).astype(np.float64)
        held = db.engine.indexes[shard_id].reconstruct_n(0, reader.rows)
        np.testing.assert_allclose(held, sketch / np.sqrt(self_influence)[:, None], rtol=1e-5, atol=1e-7)


def test_verify_and_info_cover_the_tail(db_path, tmp_path):
    import shutil

    from attribdb import layout

    info = json.loads(cli("info", db_path, "--json").stdout)
    for name, head in info["energy_kept"].items():  # the tail adds energy to every module
        assert head < info["energy_kept_with_tail"][name] <= 1
    db = tmp_path / "db"
    shutil.copytree(db_path, db)
    chunk = layout.shard_dir(db, 2) / layout.GRADS_ZARR / layout.TAIL / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    result = cli("verify", db, check=False)
    assert result.returncode == 1 and "shard 00002" in result.stderr and "tail" in result.stderr
    assert "Traceback" not in result.stderr


def test_normalized_ranking_agrees_with_exhaustive(db):
    truth = db.exhaustive(QUERIES, k=10, rank_by="normalized")
    results = db.query_batch(QUERIES, k=10, candidates=64, rank_by="normalized")
    for result in truth + results:
        values = [h.normalized_score for h in result.hits]
        assert values == sorted(values, reverse=True)
        assert all(abs(h.normalized_score) <= 1 + 1e-6 for h in result.hits)  # a cosine
    recalls = [len(set(_ids(r.hits)) & set(_ids(t.hits))) / 10 for r, t in zip(results, truth)]
    assert sum(recalls) / len(recalls) >= 0.8, recalls
    exact = db.exact(QUERIES[0]["prompt"], QUERIES[0]["completion"], k=5, rank_by="normalized")
    keys = [h.exact_score / (exact.query_self_influence * h.self_influence) ** 0.5 for h in exact.hits]
    assert keys == sorted(keys, reverse=True)
    with pytest.raises(QueryError, match="rank-by"):
        db.query("a", " b", rank_by="cosine")


def test_query_batch_equals_single_queries(db):
    batch = db.query_batch(QUERIES[:2], k=5)
    for item, result in zip(QUERIES[:2], batch):
        single = db.query(item["prompt"], item["completion"], k=5)
        assert _ids(single.hits) == _ids(result.hits)
        assert [h.score for h in single.hits] == pytest.approx([h.score for h in result.hits], rel=1e-4)


def test_exact_mode_equals_exhaustive_scores_and_token_contributions_sum(db, ground_truth):
    exact = db.exact(QUERIES[0]["prompt"], QUERIES[0]["completion"], k=5)
    assert exact.mode == "exact"
    truth = {(h.shard, h.row): h.score for h in db.exhaustive([QUERIES[0]], k=10_000)[0].hits}
    for hit in exact.hits + exact.opponents:
        assert hit.exact_score == pytest.approx(truth[(hit.shard, hit.row)], rel=1e-4, abs=1e-6)
        assert sum(hit.token_contributions) == pytest.approx(hit.exact_score, rel=1e-6, abs=1e-9)
        assert len(hit.tokens) == len(hit.token_contributions) == hit.token_span[1] - hit.token_span[0]


def test_self_influence_outliers_are_sorted(db):
    top = db.self_influence(top=5)
    values = [h.self_influence for h in top]
    assert values == sorted(values, reverse=True) and len(values) == 5


def test_result_objects_convert(db):
    result = db.query(**QUERIES[1], k=3)
    frame = result.to_pandas()
    assert list(frame["kind"]).count("hit") == 3 and "score" in frame.columns
    assert json.loads(result.to_json())["hits"][0]["doc_id"] == result.hits[0].doc_id


def test_cli_json_carries_every_field(db_path, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join(json.dumps(q) for q in QUERIES[:2]) + "\n")
    out = cli("query", db_path, "--queries", queries, "--format", "json", "-k", "3").stdout
    objects = [json.loads(line) for line in out.strip().splitlines()]
    assert len(objects) == 2
    for obj in objects:
        assert {"prompt", "completion", "mode", "hits", "opponents", "query_self_influence", "candidates",
                "timings_ms"} <= set(obj)
        assert {"total", "gradient", "search", "rescore"} <= set(obj["timings_ms"])
        hit = obj["hits"][0]
        assert {"rank", "score", "normalized_score", "self_influence", "module_scores", "doc_id", "source",
                "token_span", "char_span", "text", "shard", "row"} <= set(hit)
        assert len(hit["module_scores"]) == 8


def test_cli_table_shows_ranks_and_snippets(db_path):
    out = cli("query", db_path, "--prompt", "the cat sat", "--completion", " near the river", "-k", "4").stdout
    assert "most influential" in out and "    1 " in out and "doc" in out


def test_shell_answers_two_queries_in_one_process(db_path):
    script = "the cat sat || near the river\n:k 2\nred blue || green small\n:quit\n"
    result = subprocess.run([sys.executable, "-m", "attribdb", "shell", str(db_path)], input=script,
                            capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("most influential") == 2
    second = result.stdout.split("most influential")[2]
    assert "    2 " in second and "    3 " not in second.split("most negative")[0]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "the cat", "--completion", "  "], "completion is empty"),
    (["--prompt", "the cat " * 80, "--completion", " sat"], "the model takes at most"),
    (["--prompt", "the cat"], "give --prompt and --completion"),
])
def test_bad_queries_get_one_clear_line(db_path, args, message):
    result = cli("query", db_path, *args, check=False)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_unknown_database_and_model_mismatch_are_clear(db_path, tmp_path, other_model_dir):
    missing = cli("query", tmp_path / "nope", "--prompt", "a", "--completion", " b", check=False)
    assert missing.returncode == 1 and "not an attribdb database" in missing.stderr
    with pytest.raises(StoreError):
        api.open(tmp_path / "nope")
    moved = shutil.copytree(db_path, tmp_path / "db")
    def point_at_other_model(manifest):
        manifest["model"]["path"] = manifest["settings"]["model_path"] = str(other_model_dir)
    rewrite_manifest(moved, point_at_other_model)
    mismatch = cli("query", moved, "--prompt", "a", "--completion", " b", check=False)
    assert mismatch.returncode == 1 and "differ from the model" in mismatch.stderr
    with pytest.raises(ModelMismatchError):
        api.open(moved).query("a", " b")


def test_empty_completion_raises_in_python(db):
    with pytest.raises(QueryError):
        db.query("the cat", "")
