"""Trajectory databases: several checkpoints of a run in one database, one query summing their influence.

Checked against independent computations: single-checkpoint databases of the same models,
settings and corpus, whose exhaustive scores the trajectory's must sum to.
"""

from __future__ import annotations

import json

import pytest

from attribdb import layout
from attribdb.manifest import Manifest

from conftest import write_corpus
from dbtools import SMALL_SETTINGS, assert_same_database, cli, cli_here, one_line_error

QUERIES = [("the cat sat over the", " house"), ("red bird flew near", " the river")]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("trajectory") / "corpus.jsonl", 24, seed=3)


@pytest.fixture(scope="module")
def databases(tmp_path_factory, small_corpus, model_dir, other_model_dir):
    """A trajectory database of two models, and a single-model database of each."""
    root = tmp_path_factory.mktemp("trajectory-dbs")
    built = {"trajectory": root / "trajectory", "first": root / "first", "second": root / "second"}
    cli("build", built["trajectory"], "--corpus", small_corpus, "--model", model_dir, "--checkpoint", other_model_dir,
        "--quiet", *SMALL_SETTINGS)
    for name, model in (("first", model_dir), ("second", other_model_dir)):
        cli("build", built[name], "--corpus", small_corpus, "--model", model, "--quiet", *SMALL_SETTINGS)
    return built


def _every_row(db_path, **options) -> list[dict]:
    """Per query, every row's exhaustive (score, normalized score, per-checkpoint breakdown), by row."""
    import attribdb

    with attribdb.open(db_path) as db:
        results = db.exhaustive(QUERIES, k=db.engine.rows, quiet=True, **options)
    return [{(h.shard, h.row): (h.score, h.normalized_score, h.checkpoint_scores) for h in r.hits} for r in results]


def test_exhaustive_trajectory_scores_are_the_sums_of_single_model_databases(databases, model_dir, other_model_dir):
    trajectory = _every_row(databases["trajectory"])
    first, second = _every_row(databases["first"]), _every_row(databases["second"])
    for summed, one, other in zip(trajectory, first, second):
        assert summed.keys() == one.keys() == other.keys() and len(summed) > 100
        for row, (score, normalized, breakdown) in summed.items():
            assert score == pytest.approx(one[row][0] + other[row][0], rel=1e-6, abs=1e-9)
            # the cosines are summed, not the scores normalized: each checkpoint's scale would weigh the sum
            assert normalized == pytest.approx(one[row][1] + other[row][1], rel=1e-6, abs=1e-9)
            assert breakdown == {model_dir.name: pytest.approx({"score": one[row][0], "normalized_score": one[row][1]}),
                                 other_model_dir.name: pytest.approx({"score": other[row][0],
                                                                      "normalized_score": other[row][1]})}


def test_a_chosen_checkpoint_answers_as_its_own_database(databases, other_model_dir):
    alone, single = _every_row(databases["trajectory"], checkpoints=[other_model_dir.name])[0], \
        _every_row(databases["second"])[0]
    assert alone.keys() == single.keys()
    assert [alone[row][:2] for row in single] == [pytest.approx(values[:2], rel=1e-6) for values in single.values()]


def test_index_answers_rescored_in_full_are_the_exhaustive_trajectory_answers(databases, model_dir, other_model_dir):
    import attribdb

    truth = _every_row(databases["trajectory"])
    with attribdb.open(databases["trajectory"]) as db:
        rows = db.engine.rows
        results = db.query_batch(QUERIES, k=5, candidates=2 * rows, rescore=2 * rows, quiet=True)
    for result, every in zip(results, truth):
        best = sorted(every, key=lambda row: -every[row][1])[:5]
        assert [(h.shard, h.row) for h in result.hits] == best
        for hit in result.hits:
            assert hit.exact_normalized_score == pytest.approx(every[(hit.shard, hit.row)][1], rel=1e-5)
            assert set(hit.checkpoint_scores) == {model_dir.name, other_model_dir.name}
        json.loads(result.to_json())  # the breakdown is in the JSON answer


def test_named_documents_and_the_prefilter_sum_over_checkpoints_too(databases, model_dir):
    """--doc and --prefilter recompute at every checkpoint: exact scores are the exhaustive sums, and
    each row's token contributions add up to its summed exact score."""
    import attribdb

    [truth] = _every_row(databases["trajectory"])[:1]
    with attribdb.open(databases["trajectory"]) as db:
        named = db.score(*QUERIES[0], doc_ids=["doc3"])
        filtered = db.prefilter(*QUERIES[0], n=8, k=3)
    for hit in named.hits + filtered.hits:
        assert hit.exact_score == pytest.approx(truth[(hit.shard, hit.row)][0], rel=1e-5)
        assert sum(hit.token_contributions) == pytest.approx(hit.exact_score, rel=1e-4, abs=1e-6)
        assert model_dir.name in hit.checkpoint_scores


def test_tables_and_html_show_each_checkpoints_share(databases, model_dir, tmp_path):
    query = ("query", databases["trajectory"], "--prompt", QUERIES[0][0], "--completion", QUERIES[0][1], "-k", "2",
             "--rescore", "0")
    assert f"per checkpoint: {model_dir.name} " in cli_here(*query).stdout
    cli_here(*query, "--format", "html", "--output", tmp_path / "report.html")
    assert f"per checkpoint: {model_dir.name} " in (tmp_path / "report.html").read_text()


def test_a_single_model_database_has_no_checkpoints(built_db):
    import attribdb

    assert "checkpoints" not in json.loads((built_db / layout.MANIFEST).read_text())
    with attribdb.open(built_db) as db:
        result = db.query(*QUERIES[0], k=3, rescore=0)
        assert all(h.checkpoint_scores is None for h in result.hits + result.opponents)
        assert db.info()["checkpoints"] is None


def test_info_verify_and_plan_cover_every_checkpoint(databases, model_dir, other_model_dir):
    import attribdb
    from attribdb.row_costs import planned_cost

    with attribdb.open(databases["trajectory"]) as db:
        info = db.info()
        report = db.verify(deep=3)
    assert [c["name"] for c in info["checkpoints"]] == [model_dir.name, other_model_dir.name]
    assert info["checkpoints"][1]["model"]["path"] == str(other_model_dir.resolve())
    row_bytes = int(SMALL_SETTINGS[SMALL_SETTINGS.index("--row-bytes") + 1])
    max_length = int(SMALL_SETTINGS[SMALL_SETTINGS.index("--max-length") + 1])
    assert info["row"]["all_in"] == planned_cost(row_bytes, max_length, checkpoints=2).to_dict()
    assert row_bytes - 2 < info["row"]["all_in"]["total"] <= row_bytes  # the budget is split, not doubled
    assert report.rows == info["sequences"] and report.recomputed == 3
    printed = cli_here("plan", "--model", model_dir, "--checkpoints", "2", "--row-bytes", row_bytes,
                       "--max-length", max_length).stdout
    assert f"{info['row']['all_in']['total'] / 1024:.1f}Ki" in printed
    printed = cli_here("info", databases["trajectory"]).stdout
    assert f"checkpoint {other_model_dir.name}: step unknown, weight 1" in printed


def test_a_damaged_checkpoint_row_store_fails_verify(databases, tmp_path):
    from dbtools import copy_db

    db = copy_db(databases["trajectory"], tmp_path / "db")
    row_file = layout.shard_dir(db, 0) / layout.grads_zarr(1) / layout.ROWS / "c" / "0" / "0"
    data = bytearray(row_file.read_bytes())
    data[3] ^= 0xFF
    row_file.write_bytes(bytes(data))
    one_line_error(cli_here("verify", db), "shard 00000 grads-1.zarr", "checksum")


def test_bad_checkpoint_options_are_one_line_errors(databases, small_corpus, model_dir, other_model_dir, tmp_path):
    one_line_error(cli_here("build", tmp_path / "db", "--corpus", small_corpus, "--model", model_dir,
                            "--checkpoint", model_dir, *SMALL_SETTINGS), "all the model itself")
    one_line_error(cli_here("build", databases["first"], "--corpus", small_corpus, "--checkpoint", other_model_dir),
                   "checkpoints and weights cannot change")
    one_line_error(cli_here("query", databases["trajectory"], "--prompt", "the", "--completion", " cat",
                            "--checkpoints", "nope"), "unknown checkpoint 'nope'", model_dir.name)
    one_line_error(cli_here("build", tmp_path / "lr", "--corpus", small_corpus, "--model", model_dir,
                            "--checkpoint", other_model_dir, "--checkpoint-weights", "lr", *SMALL_SETTINGS),
                   "records no learning rate")
    one_line_error(cli_here("build", databases["trajectory"], "--corpus", small_corpus, "--model", model_dir,
                            "--checkpoint", other_model_dir, "--checkpoint-weights", "1,2", *SMALL_SETTINGS),
                   "checkpoints and weights cannot change", f"{other_model_dir.name} (weight 1)")
    for weights, message in (("1,2,3", "3 checkpoint weights for 2 checkpoints"), ("1,x", "comma-separated numbers"),
                             ("1,-2", "of at least 0"), ("0,0", "every score would be 0")):
        one_line_error(cli_here("build", tmp_path / "lr", "--corpus", small_corpus, "--model", model_dir,
                                "--checkpoint", other_model_dir, "--checkpoint-weights", weights, *SMALL_SETTINGS),
                       message)
    assert not (tmp_path / "db").exists() and not (tmp_path / "lr").exists()  # nothing half-made left behind


def test_weights_given_at_build_weigh_each_checkpoints_scores_and_cosines(databases, tmp_path, small_corpus,
                                                                          model_dir, other_model_dir):
    cli("build", tmp_path / "weighted", "--corpus", small_corpus, "--model", model_dir, "--checkpoint",
        other_model_dir, "--checkpoint-weights", "0.5,2", "--quiet", *SMALL_SETTINGS)
    assert [c.weight for c in Manifest.load(tmp_path / "weighted").checkpoints] == [0.5, 2.0]
    weighted = _every_row(tmp_path / "weighted")
    for summed, one, other in zip(weighted, _every_row(databases["first"]), _every_row(databases["second"])):
        assert summed.keys() == one.keys()
        for row, (score, normalized, _) in summed.items():
            assert score == pytest.approx(0.5 * one[row][0] + 2 * other[row][0], rel=1e-6, abs=1e-9)
            assert normalized == pytest.approx(0.5 * one[row][1] + 2 * other[row][1], rel=1e-6, abs=1e-9)


def test_default_weights_are_the_learning_rates_when_every_checkpoint_records_one(tmp_path):
    from attribdb.errors import ConfigError
    from attribdb.indexer.checkpoints import RECORD, CheckpointSpec, record, resolve

    run = tmp_path / "run"
    final, early = run / "checkpoint-4", run / "checkpoint-2"
    for folder, step, rate in ((final, 4, 0.0), (early, 2, 7.5e-4)):  # a schedule that decays to 0
        folder.mkdir(parents=True)
        record(folder, step, rate)
    default = resolve(str(final), CheckpointSpec(trainer_output=str(run)))
    assert [(c.name, c.step, c.weight) for c in default] == [("checkpoint-4", 4, 0.0), ("checkpoint-2", 2, 7.5e-4)]
    assert default == resolve(str(final), CheckpointSpec(trainer_output=str(run), weights="lr"))
    record(early, 2, 0.0)  # no learning rate above 0: every checkpoint would weigh nothing
    assert [c.weight for c in resolve(str(final), CheckpointSpec(trainer_output=str(run)))] == [1.0, 1.0]
    (early / RECORD).unlink()
    assert [c.weight for c in resolve(str(final), CheckpointSpec(trainer_output=str(run)))] == [1.0, 1.0]
    with pytest.raises(ConfigError, match="checkpoint-2 records no learning rate"):
        resolve(str(final), CheckpointSpec(trainer_output=str(run), weights="lr"))


def test_fit_makes_a_trajectory_database_that_build_then_fills(tmp_path, small_corpus, model_dir, other_model_dir):
    db = tmp_path / "db"
    cli_here("fit", db, "--corpus", small_corpus, "--model", model_dir, "--checkpoint", other_model_dir, "--quiet",
             *SMALL_SETTINGS)
    assert all(path.is_file() for c in (0, 1) for path in layout.factor_files(db, c))
    cli_here("build", db, "--corpus", small_corpus, "--quiet")  # the database's checkpoints, without options
    assert cli_here("verify", db).stdout.startswith("ok: ")
    assert [c.name for c in Manifest.load(db).checkpoints] == [model_dir.name, other_model_dir.name]


def test_the_trainer_callback_refuses_steps_it_cannot_save(tmp_path):
    from attribdb.errors import ConfigError
    from attribdb.trajectory import TrajectoryCallback

    for bad in ({"steps": [0]}, {"steps": ["200"]}, {"every": 0}, {"final": False}):
        with pytest.raises(ConfigError):
            TrajectoryCallback(tmp_path, **bad)
    callback = TrajectoryCallback(tmp_path, steps=[3], every=10)
    assert [step for step in range(1, 31) if callback.wanted(step)] == [3, 10, 20, 30]


@pytest.mark.slow
def test_a_killed_trajectory_build_resumes_to_the_uninterrupted_database(databases, small_corpus, model_dir,
                                                                          other_model_dir, tmp_path):
    """Killed after the second checkpoint's rows of a unit are written but before the unit commits,
    then resumed, then appended to: the same bits as a build that ran straight through."""
    args = ("--corpus", small_corpus, "--model", model_dir, "--checkpoint", other_model_dir, "--quiet",
            *SMALL_SETTINGS)
    killed = cli("build", tmp_path / "db", *args, env_extra={"ATTRIBDB_KILL_AT": "unit-written:5"}, check=False)
    assert killed.returncode == -9
    assert cli("verify", tmp_path / "db", check=False).returncode == 3
    cli("build", tmp_path / "db", *args)
    assert_same_database(tmp_path / "db", databases["trajectory"])
    more = write_corpus(tmp_path / "more.jsonl", 6, seed=9, start=100)
    cli("append", tmp_path / "db", "--corpus", more, "--quiet")
    manifest = Manifest.load(tmp_path / "db")
    assert cli("verify", tmp_path / "db").stdout.startswith(f"ok: {sum(g.sequences for g in manifest.generations)}")
    for shard_id in manifest.generations[-1].shard_ids:
        assert (layout.shard_dir(tmp_path / "db", shard_id) / layout.grads_zarr(1)).is_dir()


@pytest.mark.slow
def test_trainer_callback_database_answers_as_the_trainers_own_checkpoints(tmp_path, small_corpus, model_dir):
    """A real Trainer run: the database built from what TrajectoryCallback saved answers exactly as
    the one built from the Trainer's own checkpoint folders, each weighted by its learning rate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import attribdb
    from attribdb.trajectory import TrajectoryCallback

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    ids = [i for text in texts for i in tokenizer(text)["input_ids"]]
    examples = [{"input_ids": torch.tensor(ids[i:i + 16]), "labels": torch.tensor(ids[i:i + 16])}
                for i in range(0, len(ids) - 16, 16)]
    saved = tmp_path / "trajectory"
    arguments = TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                                  save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                  disable_tqdm=True)
    trainer = Trainer(model, arguments, train_dataset=examples, processing_class=tokenizer,
                      callbacks=[TrajectoryCallback(saved, steps=[2])])
    trainer.train()
    assert sorted(p.name for p in saved.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # the chosen step, the end

    common = ("--corpus", small_corpus, "--quiet", *SMALL_SETTINGS)
    cli("build", tmp_path / "from-callback", "--model", saved / "checkpoint-4", "--checkpoints-from", saved, *common)
    own = tmp_path / "out"  # weighed by the learning rates its trainer_state.json logs, as the default does too
    cli("build", tmp_path / "from-trainer", "--model", own / "checkpoint-4", "--checkpoint", own / "checkpoint-2",
        "--checkpoint-weights", "lr", *common)
    callback, own = (Manifest.load(tmp_path / name).checkpoints for name in ("from-callback", "from-trainer"))
    assert [(c.name, c.step, c.weight) for c in callback] == [(c.name, c.step, c.weight) for c in own]
    assert [(c.step, c.weight) for c in callback] == [(4, pytest.approx(2.5e-4)), (2, pytest.approx(7.5e-4))]
    assert callback[1].model_fingerprint == own[1].model_fingerprint
    answers = []
    for name in ("from-callback", "from-trainer"):
        with attribdb.open(tmp_path / name) as db:
            answers.append([r.to_dict() for r in db.exhaustive(QUERIES, k=5, quiet=True)])
    for one, other in zip(*answers):
        one.pop("timings_ms"), other.pop("timings_ms")
        assert one == other
