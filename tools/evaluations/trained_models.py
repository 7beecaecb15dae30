"""Trained models for the fidelity evaluations (tools/evaluations/eval_rows.py, \
tools/evaluations/eval_fit_precision.py),
each cached in a work folder.

- ``demo``: the demo's corpus and model, in the folders ``attribdb demo --workdir`` uses
  (``corpus/``, ``model/``), so either reuses what the other trained.
- ``second``: a larger GPT-2 (4 layers × 256 wide) trained on more text: the demo corpus (its
  invented facts, so fact tracing can be measured on it too) plus 1,500 documents of real English
  sentences from the standard library (benchutil.write_corpus).  It reuses the demo's trainer with
  another DemoModelConfig; about 300 steps of 16 × 128 tokens, a few minutes on one thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tools.benchutil import write_corpus

SECOND_MODEL = dict(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, n_positions=128, seq_length=128,
                    batch_size=16, train_steps=300, learning_rate=2e-3, fact_repeats=24, seed=0)
SECOND_EXTRA_DOCS = 1500


@dataclass(frozen=True)
class TrainedModel:
    name: str
    corpus: Path  # corpus.jsonl: {"id", "text", "kind"} per line
    facts: list  # attribdb.demo.facts.Fact
    model_dir: Path


def demo_model(workdir: Path) -> TrainedModel:
    from attribdb.demo.facts import generate_corpus
    from attribdb.demo.run import FULL
    from attribdb.demo.train import train_model

    corpus, facts = generate_corpus(workdir / "corpus", FULL.corpus)
    return TrainedModel("demo (GPT-2 2×128)", corpus, facts, train_model(corpus, workdir / "model", FULL.model))


def second_model(workdir: Path) -> TrainedModel:
    from attribdb.demo.facts import generate_corpus
    from attribdb.demo.run import FULL
    from attribdb.demo.train import DemoModelConfig, train_model

    demo_corpus, facts = generate_corpus(workdir / "second-corpus" / "demo", FULL.corpus)
    folder = workdir / "second-corpus"
    extra = write_corpus(folder / "english.jsonl", SECOND_EXTRA_DOCS, seed=1)
    corpus = folder / "corpus.jsonl"
    lines = demo_corpus.read_text().splitlines()
    for line in extra.read_text().splitlines():
        doc = json.loads(line)
        lines.append(json.dumps({"id": f"en-{doc['id']}", "text": doc["text"], "kind": "background"}, sort_keys=True))
    text = "".join(line + "\n" for line in lines)
    if not corpus.is_file() or corpus.read_text() != text:
        corpus.write_text(text)
    model_dir = train_model(corpus, workdir / "second-model", DemoModelConfig(**SECOND_MODEL))
    return TrainedModel("second (GPT-2 4×256)", corpus, facts, model_dir)


MODEL_SETS = {"demo": (demo_model,), "second": (second_model,), "both": (demo_model, second_model)}


def add_evaluation_options(parser, rows: int) -> None:
    """The options of every evaluation over these models: which models and where they are cached, and
    how many rows, queries and fitting sequences it draws from each."""
    parser.add_argument("--model-set", choices=sorted(MODEL_SETS), default="both")
    parser.add_argument("--workdir", type=Path, default=Path("attribdb-demo"),
                        help="where the trained models are cached (the demo's own folder by default)")
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--fit-sequences", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0,
                        help="chooses the rows, the queries and the fit sample (and seeds any random projection)")
