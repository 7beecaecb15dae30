"""The second evaluation world has the structure its evaluations rely on (attribdb.demo.world2)."""

from __future__ import annotations

import json
from collections import defaultdict

from attribdb.demo.world2 import RELATIONS, World2Config, generate_world

SMALL = World2Config(people=6, many=3, background_docs=20)


def test_world_is_deterministic(tmp_path):
    first, _ = generate_world(tmp_path / "a", SMALL)
    second, _ = generate_world(tmp_path / "b", SMALL)
    assert first.read_bytes() == second.read_bytes()
    assert generate_world(tmp_path / "c", World2Config(seed=1, people=6, many=3, background_docs=20))[0].read_bytes() \
        != first.read_bytes()


def test_structure(tmp_path):
    corpus, queries = generate_world(tmp_path, SMALL)
    docs = {d["id"]: d for d in map(json.loads, corpus.read_text().splitlines())}
    facts = defaultdict(list)  # one fact, several query phrasings
    for query in queries:
        facts[query.fact_id.rsplit("-q", 1)[0]].append(query)
    assert len(facts) == SMALL.people * len(RELATIONS)
    counts = sorted(len(qs[0].doc_ids) for qs in facts.values())
    assert counts == [1] * SMALL.people + [SMALL.many] * SMALL.people, "half the facts stated once, half many times"
    for phrasings in facts.values():
        fact = phrasings[0]
        assert len({q.prompt for q in phrasings}) == len(phrasings) >= 2
        assert all(q.doc_ids == fact.doc_ids and q.completion == fact.completion for q in phrasings)
        statement_docs = [docs[d]["text"] for d in fact.doc_ids]
        for text in statement_docs:
            assert fact.entity + " " in text and fact.value in text
            assert len(text) > 2 * len(fact.prompt + fact.completion), "the statement is part of a longer paragraph"
        naming = [d for d in docs.values() if fact.entity in d["text"] and d["id"] not in fact.doc_ids]
        assert naming, "distractors share the person's name"
        assert not any(fact.value in d["text"] for d in naming), "... but never state the fact"
        for query in phrasings:
            assert not any(query.prompt in d["text"] for d in docs.values()), "query phrasings are held out"
            others = {q.entity for q in queries} - {fact.entity}
            assert any(query.prompt.replace(fact.entity, other) in d["text"] for other in others
                       for d in docs.values()), "each held-out phrasing states some other person's fact"
    assert {d["kind"] for d in docs.values()} == {"fact", "distractor", "background"}
