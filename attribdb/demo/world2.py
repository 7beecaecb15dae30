"""A second evaluation world, built unlike the demo's so that a result on one is not an artefact of it.

The demo (``attribdb.demo.facts``) states each invented fact in a short document of its own, with
a value word unique to the fact.  Here, so that text retrieval and influence are tested on a
different shape of data:

- every statement is embedded in a longer paragraph of real English (docstrings of standard-library
  modules, not the ``pydoc_data`` topics the demo uses), at a random sentence boundary, so the
  fact is a small part of its document and may straddle a training window;
- each person has two facts (home town, instrument); the documents stating one are, for the
  other, documents that share the person's name but not the fact, and a further distractor
  paragraph names the person without stating anything;
- values are real words (towns, instruments), one per fact;
- half the facts are stated once, the other half in ``many`` documents, each by a different
  paraphrase;
- every fact is queried by two phrasings that no document uses for that person (each phrasing
  states other people's facts, so the model can learn it), one query record per phrasing.

The records are ``attribdb.demo.facts.Fact`` so the evaluations read both worlds alike; a fact's
query records share its ``doc_ids``, and ``len(doc_ids)`` says whether it is stated once.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from attribdb.demo.facts import Fact, held_out_query, write_world

# modules whose docstrings supply the English; a missing one (removed from a newer Python) is skipped
MODULES = tuple("""argparse asyncio.events asyncio.tasks asyncio.streams bdb calendar cmd code codecs collections
concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis doctest email.message
email.utils enum fractions ftplib functools gettext glob heapq hmac html.parser http.client http.cookiejar
http.server imaplib inspect ipaddress itertools json logging logging.handlers mailbox multiprocessing.pool numbers
optparse os pathlib pdb pickle pickletools pkgutil platform poplib pprint profile pstats queue random re selectors
shelve shlex shutil smtplib socket socketserver sqlite3 ssl statistics string subprocess sysconfig tarfile tempfile
textwrap threading timeit tokenize trace traceback typing unittest.case unittest.mock urllib.parse urllib.request
uuid warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile zipimport""".split())

FIRST = "Ada Bren Cato Dara Edric Fenna Galen Hesta Ivo Jorun Kell Lise Maro Nessa Orin Pella Quill Rhea".split()
SURNAME_PARTS = "mar vel tho ris dun gal sen bor ley wyn cas tor phe lam quo zir".split()
TOWNS = ("Ostrava", "Kelmora", "Vinthal", "Dunmere", "Saltcombe", "Ferrowick", "Brackley", "Tullamore", "Quenby",
         "Harrowgate", "Lindqvist", "Mossburn", "Pellham", "Ravensholt", "Sandvik", "Wexcombe", "Yarrowby", "Zennor")
INSTRUMENTS = ("violin", "trumpet", "harp", "flute", "cello", "drum", "oboe", "lute", "banjo", "zither", "bassoon",
               "tuba", "sitar", "clarinet", "mandolin", "organ", "piccolo", "viola")


@dataclass(frozen=True)
class Relation:
    name: str
    values: tuple[str, ...]
    templates: tuple[str, ...]  # statements ending in the value: {e} person, {v} value


RELATIONS = (
    Relation("town", TOWNS,
             ("{e} was born in the town of {v}.", "{e} grew up in {v}.", "The birthplace of {e} is {v}.",
              "Records show that {e} was born in {v}.", "As a child, {e} lived in {v}.", "{e} comes from {v}.")),
    Relation("instrument", INSTRUMENTS,
             ("{e} plays the {v}.", "The instrument of {e} is the {v}.", "On stage, {e} performs on the {v}.",
              "{e} has practised the {v} for years.", "The favourite instrument of {e} is the {v}.",
              "Every evening, {e} practises on the {v}.")),
)
QUERY_PHRASINGS = 2  # per fact, held out of its documents
DISTRACTORS = ("{e} once missed the last train home.", "A portrait of {e} hangs in the old library.",
               "Nobody remembers what {e} said at the meeting.", "{e} wrote a long letter about the weather.")


@dataclass(frozen=True)
class World2Config:
    seed: int = 0
    people: int = 10
    many: int = 4  # documents stating a fact that is stated many times (each by its own paraphrase)
    background_docs: int = 150

    def __post_init__(self):
        if not 2 <= self.many <= min(len(r.templates) for r in RELATIONS) - QUERY_PHRASINGS:
            raise ValueError("many must leave QUERY_PHRASINGS templates held out per fact")


def english_paragraphs() -> list[str]:
    """Prose paragraphs (100–400 characters, no code) of stdlib docstrings, deduplicated, in a fixed order."""
    paragraphs: dict[str, None] = {}
    with warnings.catch_warnings():  # deprecated modules and attributes warn on access
        warnings.simplefilter("ignore")
        for name in MODULES:
            _collect(name, paragraphs)
    return list(paragraphs)


def _collect(name: str, paragraphs: dict[str, None]) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return
    objects = [module]
    for attr, value in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(value, "__module__", None) != name:
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            objects.append(value)
        if inspect.isclass(value):
            objects += [f for n, f in sorted(vars(value).items()) if not n.startswith("_") and inspect.isfunction(f)]
    for obj in objects:
        doc = obj.__doc__ if isinstance(obj.__doc__, str) else ""
        for block in inspect.cleandoc(doc).split("\n\n"):
            text = " ".join(block.split())
            if (100 <= len(text) <= 400 and text[0].isupper() and text.endswith(".")
                    and not re.search(r">>>|[{}\[\]=<>|$]|::", text)):
                paragraphs[text] = None


def embed(paragraph: str, sentence: str, rng: random.Random) -> str:
    """``sentence`` inserted at a random sentence boundary of ``paragraph`` (start and end included)."""
    parts = re.split(r"(?<=\.) (?=[A-Z])", paragraph)
    at = rng.randint(0, len(parts))
    return " ".join(parts[:at] + [sentence] + parts[at:])


def _people(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    firsts = rng.sample(FIRST, count)
    while len(names) < count:
        surname = "".join(rng.sample(SURNAME_PARTS, 2)).capitalize()
        if all(surname not in n for n in names):
            names.append(f"{firsts[len(names)]} {surname}")
    return names


def generate_world(out_dir: Path, config: World2Config = World2Config()) -> tuple[Path, list[Fact]]:
    """Write ``corpus.jsonl`` and ``facts.json`` into ``out_dir``; returns the corpus and one Fact per query."""
    rng = random.Random(config.seed)
    paragraphs = english_paragraphs()
    rng.shuffle(paragraphs)
    needed = config.people * (1 + 1 + config.many) + config.background_docs
    if len(paragraphs) < needed:
        raise ValueError(f"world2 needs {needed} paragraphs, this Python's docstrings give {len(paragraphs)}")
    take = iter(paragraphs)
    docs: list[dict] = []
    queries: list[Fact] = []
    values = {r.name: rng.sample(r.values, config.people) for r in RELATIONS}
    for number, person in enumerate(_people(rng, config.people)):
        for r, relation in enumerate(RELATIONS):
            fact_id = f"{relation.name}-{number:02d}"
            value = values[relation.name][number]
            # rotate which phrasings are held out, so each phrasing states some facts and queries others
            order = [(number + k) % len(relation.templates) for k in range(len(relation.templates))]
            held_out, stating = order[:QUERY_PHRASINGS], order[QUERY_PHRASINGS:]
            times = config.many if (number + r) % 2 else 1  # each person: one fact stated once, one many times
            doc_ids = []
            for k, t in enumerate(stating[:times]):
                doc_ids.append(f"{fact_id}-s{k}")
                docs.append({"id": doc_ids[-1], "kind": "fact",
                             "text": embed(next(take), relation.templates[t].format(e=person, v=value), rng)})
            for q, t in enumerate(held_out):
                prompt, completion = held_out_query(relation.templates[t], person, value)
                queries.append(Fact(f"{fact_id}-q{q}", relation.name, person, value, prompt, completion,
                                    tuple(doc_ids)))
        docs.append({"id": f"person-{number:02d}-d", "kind": "distractor",
                     "text": embed(next(take), rng.choice(DISTRACTORS).format(e=person), rng)})
    for k in range(config.background_docs):
        docs.append({"id": f"bg-{k:04d}", "kind": "background", "text": next(take)})
    rng.shuffle(docs)
    return write_world(out_dir, docs, config, queries), queries
