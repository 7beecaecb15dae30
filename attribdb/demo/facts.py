"""A deterministic demo corpus: real English text plus invented facts to trace.

Background documents are paragraphs of the Python documentation that ships
with the standard library (``pydoc_data``).  Facts are statements about
invented entities ("The capital of Vorlandia is Quessel."), each stated by
several paraphrases in different documents; distractor documents share the
entity or the value word but never state the fact.  Each fact's query uses a
phrasing no document uses, so a text search cannot find it verbatim.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

SYLLABLES = ("ka ve lor qui zan tor mi sel dra ne vos lin tha rek pol um bri sa gor el fen yas cor wi dal "
             "mer osk tu ran hel").split()


@dataclass(frozen=True)
class Relation:
    name: str
    templates: tuple[str, ...]  # statements ending in the value: {e} entity, {v} value
    distractors: tuple[str, ...]  # share {e} or {v}, never the fact


RELATIONS = (
    Relation("capital",
             ("The capital of {e} is {v}.", "The capital city of {e} is {v}.",
              "Travellers to {e} arrive in its capital, {v}.", "In {e}, the seat of government is {v}.",
              "The largest city in {e} is its capital, {v}."),
             ("{e} is known for its mountains and cold winters.", "A poem about {v} was written by a sailor.",
              "Few maps of {e} were drawn before the war.")),
    Relation("language",
             ("The people of {e} speak {v}.", "The language of {e} is {v}.", "In {e}, most people speak {v}.",
              "Children in {e} learn to speak {v}.", "The official language of {e} is {v}."),
             ("{e} trades grain with its neighbours.", "Scholars argue about where the word {v} comes from.",
              "The rivers of {e} freeze every year.")),
    Relation("founder",
             ("{e} was founded by {v}.", "The founder of {e} is {v}.", "The company {e} was started by {v}.",
              "Long ago, {e} was founded in a small workshop by {v}.", "Everyone knows that {e} was created by {v}."),
             ("{e} sells lamps and clocks.", "{v} liked to walk along the harbour.",
              "Workers at {e} start early in the morning.")),
)


@dataclass(frozen=True)
class DemoCorpusConfig:
    seed: int = 0
    facts_per_relation: int = 20
    paraphrases_per_fact: int = 4
    background_docs: int = 1000

    def __post_init__(self):
        if not 1 <= self.paraphrases_per_fact < min(len(r.templates) for r in RELATIONS):
            raise ValueError("paraphrases_per_fact must be between 1 and the number of templates")


@dataclass(frozen=True)
class Fact:
    fact_id: str
    relation: str
    entity: str
    value: str
    prompt: str
    completion: str
    doc_ids: tuple[str, ...]  # the documents that state the fact


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    names = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in taken and len(name) >= 5:
            taken.add(name)
            names.append(name)
    return names


def background_paragraphs() -> list[str]:
    """Paragraph-sized pieces of the Python documentation bundled with the standard library."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            text = " ".join(block.split())
            if 150 <= len(text) <= 1200 and not text.startswith((">>>", "...")):
                paragraphs.append(text)
    return paragraphs


def held_out_query(template: str, entity: str, value: str) -> tuple[str, str]:
    """The statement cut before its value: everything up to it is the prompt, " value" the completion.

    Punctuation before the value stays in the prompt ("... arrive in its capital,"): a prompt
    without it asks the model for a continuation it never saw, and the model, knowing the fact,
    rightly answers ", value" instead.
    """
    before = template.format(e=entity, v="\0").split("\0")[0]
    return before.rstrip(" "), f" {value}"


def generate_corpus(out_dir: Path, config: DemoCorpusConfig = DemoCorpusConfig()) -> tuple[Path, list[Fact]]:
    """Write ``corpus.jsonl`` and ``facts.json`` into ``out_dir``; the same config gives the same bytes."""
    rng = random.Random(config.seed)
    taken: set[str] = set()
    docs: list[dict] = []
    facts: list[Fact] = []
    for relation in RELATIONS:
        entities = _names(rng, config.facts_per_relation, taken)
        values = _names(rng, config.facts_per_relation, taken)
        for number, (entity, value) in enumerate(zip(entities, values)):
            fact_id = f"{relation.name}-{number:02d}"
            # one template per fact is held out for its query; the others state it in separate documents,
            # and every template states some other facts, so the model can learn each phrasing
            held_out = number % len(relation.templates)
            stating = [t for k, t in enumerate(relation.templates) if k != held_out]
            doc_ids = []
            for k, template in enumerate(rng.sample(stating, config.paraphrases_per_fact)):
                doc_id = f"{fact_id}-p{k}"
                docs.append({"id": doc_id, "text": template.format(e=entity, v=value), "kind": "fact"})
                doc_ids.append(doc_id)
            for k, template in enumerate(relation.distractors):
                # distractors borrow the entity or the value of *this* fact, never both
                docs.append({"id": f"{fact_id}-d{k}", "text": template.format(e=entity, v=value), "kind": "distractor"})
            prompt, completion = held_out_query(relation.templates[held_out], entity, value)
            facts.append(Fact(fact_id, relation.name, entity, value, prompt, completion, tuple(doc_ids)))
    paragraphs = background_paragraphs()
    for k, text in enumerate(rng.sample(paragraphs, min(config.background_docs, len(paragraphs)))):
        docs.append({"id": f"bg-{k:04d}", "text": text, "kind": "background"})
    rng.shuffle(docs)
    return write_world(out_dir, docs, config, facts), facts


def write_world(out_dir: Path, docs: list[dict], config, facts: list[Fact]) -> Path:
    """``corpus.jsonl`` (one document a line) and ``facts.json`` (the config and the facts) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs))
    (out_dir / "facts.json").write_text(json.dumps({"config": asdict(config), "facts": [asdict(f) for f in facts]},
                                                   indent=1, sort_keys=True))
    return corpus


def load_facts(out_dir: Path) -> list[Fact]:
    data = json.loads((out_dir / "facts.json").read_text())
    return [Fact(**{**f, "doc_ids": tuple(f["doc_ids"])}) for f in data["facts"]]
