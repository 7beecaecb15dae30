"""The demo corpus generator is deterministic and honest; a reduced demo runs end to end."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest

from attribdb.demo.facts import RELATIONS, DemoCorpusConfig, generate_corpus, load_facts
from attribdb.demo.run import demo_queries, rank_of_first_fact_document
from attribdb.demo.train import CACHE_FILE, DemoModelConfig, train_model

from dbtools import cli

SMALL = DemoCorpusConfig(facts_per_relation=5, background_docs=60)


def test_generator_is_deterministic(tmp_path):
    first, _ = generate_corpus(tmp_path / "a", SMALL)
    second, _ = generate_corpus(tmp_path / "b", SMALL)
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "a" / "facts.json").read_bytes() == (tmp_path / "b" / "facts.json").read_bytes()
    other, _ = generate_corpus(tmp_path / "c", DemoCorpusConfig(seed=1, facts_per_relation=5, background_docs=60))
    assert other.read_bytes() != first.read_bytes()


def test_facts_are_stated_where_claimed_and_nowhere_else(tmp_path):
    corpus, facts = generate_corpus(tmp_path, SMALL)
    docs = {d["id"]: d for d in map(json.loads, corpus.read_text().splitlines())}
    assert load_facts(tmp_path) == facts
    assert len({f.value for f in facts}) == len(facts), "values must be unique"
    for fact in facts:
        assert len(fact.doc_ids) == SMALL.paraphrases_per_fact
        for doc_id in fact.doc_ids:
            assert fact.entity in docs[doc_id]["text"] and fact.value in docs[doc_id]["text"]
        stating = {i for i, d in docs.items() if fact.entity in d["text"] and fact.value in d["text"]}
        assert stating == set(fact.doc_ids), "only the fact's documents may contain entity and value together"
        assert not any(fact.prompt in d["text"] for d in docs.values()), "the query phrasing must be held out"
        statements = [t.format(e=fact.entity, v=fact.value) for r in RELATIONS if r.name == fact.relation
                      for t in r.templates]
        assert any(s.startswith(fact.prompt + fact.completion) for s in statements), \
            "prompt + completion must be a statement's own words, punctuation included"
    kinds = {d["kind"] for d in docs.values()}
    assert kinds == {"fact", "distractor", "background"}


def test_the_demo_asks_per_relation_and_ranks_documents_not_rows(tmp_path):
    """The demo's own scoring of an answer (the end-to-end run below is slow): the rank of the first
    document stating the fact among distinct documents, a long document's several rows counted once."""
    _, facts = generate_corpus(tmp_path, SMALL)
    asked = demo_queries(facts, per_relation=2)
    assert [f.relation for f in asked] == [r for r in dict.fromkeys(f.relation for f in facts) for _ in range(2)]
    fact = asked[0]
    answer = SimpleNamespace(hits=[SimpleNamespace(doc_id=d) for d in ("bg1", "bg1", "bg2", fact.doc_ids[0], "bg3")])
    assert rank_of_first_fact_document(answer, fact) == 3
    assert rank_of_first_fact_document(SimpleNamespace(hits=answer.hits[:3]), fact) is None


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end(tmp_path):
    result = cli("demo", "--quick", "--quiet", "--workdir", tmp_path / "demo")
    own = ("1/4 ", "2/4 ", "3/4 ", "4/4 ", "    ")  # the demo's steps; no bar, no third-party notice
    assert all(line.startswith(own) for line in result.stderr.splitlines()), result.stderr
    assert result.stdout.count("rank of the first document that states the fact") == 3
    assert "demo finished" in result.stdout
    hits = _answer_lines(result.stdout)
    assert len([line for line in hits if "cosine" in line]) == 3 * 5, "five hits per query"
    corpus_ids = {json.loads(line)["id"] for path in (tmp_path / "demo" / "corpus").glob("*.jsonl")
                  for line in path.open()}
    shown = {re.search(r"score\s+\S+\s+(\S+)", line).group(1) for line in hits if "cosine" in line}
    assert shown and shown <= corpus_ids, "every hit names a document of the corpus"
    again = cli("demo", "--quick", "--quiet", "--workdir", tmp_path / "demo")  # from the cache
    assert _answer_lines(again.stdout) == hits, "the cached model and database give the same hits and scores"


def _answer_lines(stdout: str) -> list[str]:
    """The hits and ranks the demo printed, without the timings."""
    return [line for line in stdout.split("demo finished")[0].splitlines() if line.startswith("  ")]


@pytest.mark.slow
def test_checkpoints_leave_the_final_model_and_its_cache_key_alone(tmp_path):
    """Saving checkpoints must not change the training, nor the fingerprint of models trained without them."""
    corpus, _ = generate_corpus(tmp_path / "corpus", SMALL)
    config = DemoModelConfig(vocab_size=512, n_layer=1, n_embd=32, batch_size=4, train_steps=6, fact_repeats=2)
    plain = train_model(corpus, tmp_path / "plain", config, progress=False)
    saved = train_model(corpus, tmp_path / "saved", config, progress=False, checkpoints=(2, 4))
    assert (saved / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    assert "checkpoints" not in json.loads((plain / CACHE_FILE).read_text())
    assert json.loads((saved / CACHE_FILE).read_text())["checkpoints"] == [2, 4]
    for step in (2, 4):
        weights = (saved / f"checkpoint-{step}" / "model.safetensors").read_bytes()
        assert weights != (plain / "model.safetensors").read_bytes()
        assert (saved / f"checkpoint-{step}" / "tokenizer.json").is_file()
    # each records its step and the learning rate it trained with (cosine decay, no warm-up at 6 steps)
    from attribdb.indexer.checkpoints import CheckpointSpec, resolve

    held = resolve(str(saved), CheckpointSpec(paths=(str(saved / "checkpoint-2"), str(saved / "checkpoint-4")),
                                              weights="lr"))
    assert [(c.step, c.weight) for c in held] == [
        (step, pytest.approx(config.learning_rate * 0.5 * (1 + math.cos(math.pi * (step - 1) / 6))))
        for step in (6, 2, 4)]
