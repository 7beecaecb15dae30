"""A corpus edited between a kill and the resume is refused, even with the same sequence count."""

from __future__ import annotations

import pytest

from attribdb.indexer import sequences
from attribdb.indexer.corpus import CorpusSpec
from attribdb.manifest import Manifest

from conftest import write_corpus
from dbtools import SMALL_SETTINGS, cli, cli_here, one_line_error


@pytest.mark.slow
def test_an_edited_corpus_is_refused_on_resume(tmp_path, model_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", 40, seed=5)
    db = tmp_path / "db"
    build = ["build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS]
    killed = cli(*build, env_extra={"ATTRIBDB_KILL_AT": "unit-committed:2"}, check=False)
    assert killed.returncode == -9
    generation = Manifest.load(db).generations[0]
    lines = corpus.read_text().splitlines()
    lines[-1] = lines[-1].replace(" the ", " cat ", 1) if " the " in lines[-1] else lines[-1].replace(".", "!")
    corpus.write_text("\n".join(lines) + "\n")

    from attribdb.models import load_model
    from attribdb.settings import DatabaseSettings

    _, tokenizer = load_model(model_dir)
    settings = DatabaseSettings(model_path=str(model_dir), max_length=16)
    edited = sequences.plan(CorpusSpec(str(corpus)), tokenizer, settings)
    assert edited.sequences == generation.sequences, "the edit must keep the count, or the test proves nothing"
    assert edited.fingerprint != generation.fingerprint

    one_line_error(cli_here(*build), "changed since the interrupted build", "different text or tokens")
    assert Manifest.load(db).generations[0] == generation, "a refused resume changes nothing"
