"""A causal LM trained on real text nobody here wrote: Debian's man pages, one row per document.

The demo and the second model are trained on text this project made (invented facts, the Python
docs' sentences shuffled); a representation chosen on them alone may be chosen for that text.  This
world draws documents from the man pages installed on the machine (tools/evaluations/manpages.py),
each short enough to be exactly one 128-token row, so rows are documents and the linear datamodeling
score (tools/evaluations/lds.py) can drop and keep whole rows.  Queries are held-out passages of the
same pages (never a training document): prompt = the passage's first two thirds, completion = the
rest, so a query's nearest training documents are its page's other passages.

Everything is deterministic given ``RealTextConfig.seed`` and the installed pages: ``SOURCE.json``
beside the corpus records the page and Debian package of every document and query, the Debian
version and a digest of the corpus.  The tokenizer is the demo's (a byte-level BPE,
``attribdb.demo.train.train_tokenizer``) trained here on the training documents only, before the
model, so documents can be cut to fit one row in its tokens, and so that models retrained on halves
of the corpus (tools/evaluations/lds.py) share it and their losses stay comparable.

Run: python -m tools.evaluations.realtext [--workdir /work/cache/lds]: writes the corpus, trains
the model (cached) and prints its training and held-out loss.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from attribdb.demo.train import DemoModelConfig
from tools.evaluations.manpages import ManPage, packages_of, page_files, read_page

SKIPPED_FAMILIES = ("gcloud",)  # 16,000 pages generated from one template would swamp the rest
SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")


@dataclass(frozen=True)
class RealTextConfig:
    """The corpus, its queries and the model's training recipe.

    ``epochs`` (not steps) is the recipe, so a model retrained on half the corpus makes half the
    steps over the same number of passes: what "the same recipe" means in the LDS literature.
    Six passes at a learning rate of 5e-3 with a 2,048-token vocabulary (the output layer is most of
    a 2×128 GPT-2's compute) keep one half's retraining near 40 s of one core (50 halves: about
    35 minutes); the model reaches 5.49 nats per token on training passages and 5.59 on held-out
    ones against the corpus's unigram entropy of 6.47 (``main`` prints them).
    """

    seed: int = 0
    documents: int = 1000
    queries: int = 50
    docs_per_page: int = 2  # training documents drawn from one page, so a query's page is in the corpus
    min_chars: int = 150
    max_chars: int = 450  # a document is cut further, at a word, to fit max_tokens
    max_tokens: int = 128  # one row of a database built at max-length 128
    epochs: float = 6.0
    model: DemoModelConfig = field(default_factory=lambda: DemoModelConfig(
        vocab_size=2048, n_layer=2, n_embd=128, n_head=4, n_positions=128, seq_length=128, batch_size=16,
        train_steps=0, learning_rate=5e-3, fact_repeats=1, seed=0))

    def key(self) -> str:
        """A short digest naming this configuration's folder, so changed settings never reuse stale files."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class RealTextWorld:
    name: str
    corpus: Path  # corpus.jsonl: {"id", "text", "kind", "source"} per line
    queries: list  # [{"prompt", "completion", "source"}]
    model_dir: Path
    tokenizer_dir: Path
    config: RealTextConfig

    @property
    def doc_ids(self) -> list[str]:
        return [json.loads(line)["id"] for line in self.corpus.read_text().splitlines() if line.strip()]


# ---- documents ----------------------------------------------------------------


def split_long(paragraph: str, limit: int) -> list[str]:
    """A paragraph as pieces of at most ``limit`` characters, cut at sentence ends where it can, else at words."""
    pieces, current = [], ""
    for sentence in SENTENCE_END.split(paragraph):
        while len(sentence) > limit:
            cut = sentence.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            pieces.append(sentence[:cut])
            sentence = sentence[cut:].strip()
        if current and len(current) + 1 + len(sentence) > limit:
            pieces.append(current)
            current = ""
        current = f"{current} {sentence}".strip()
    return pieces + ([current] if current else [])


def page_chunks(page: ManPage, config: RealTextConfig) -> list[str]:
    """A page's prose as consecutive passages of ``min_chars``..``max_chars``: paragraphs joined by
    newlines while they fit, long ones split."""
    chunks, current = [], ""
    for paragraph in page.paragraphs:
        for piece in split_long(paragraph, config.max_chars):
            if current and len(current) + 1 + len(piece) > config.max_chars:
                chunks.append(current)
                current = ""
            current = f"{current}\n{piece}" if current else piece
    chunks.append(current)
    return [c for c in chunks if len(c) >= config.min_chars]


def draw_passages(config: RealTextConfig) -> tuple[list[tuple[ManPage, str]], list[tuple[ManPage, str]]]:
    """(training passages, held-out passages): pages in a seeded order, ``docs_per_page`` passages
    of each to training and one more, where the page has it, held out."""
    rng = random.Random(config.seed)
    files = [p for p in page_files() if not p.name.startswith(SKIPPED_FAMILIES)]
    rng.shuffle(files)
    training, held_out = [], []
    for path in files:
        page = read_page(path)
        chunks = page_chunks(page, config) if page else []
        if len(chunks) < 2:
            continue
        rng.shuffle(chunks)
        taken = chunks[:min(config.docs_per_page, len(chunks) - 1)]
        training += [(page, text) for text in taken]
        held_out.append((page, chunks[len(taken)]))
        if len(training) >= config.documents:
            break
    return training[:config.documents], held_out


def fit_tokens(text: str, tokenizer, max_tokens: int) -> str:
    """``text`` cut at the last word boundary that keeps it within ``max_tokens`` tokens."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(encoded["input_ids"]) <= max_tokens:
        return text
    end = encoded["offset_mapping"][max_tokens - 1][1]
    cut = text.rfind(" ", 0, end)
    text = text[:cut if cut > 0 else end].rstrip()
    return fit_tokens(text, tokenizer, max_tokens)  # a cut can merge tokens differently; check again


def as_query(text: str) -> tuple[str, str]:
    """Prompt = the passage up to the word nearest two thirds of its length; completion = the rest,
    its leading space kept (so prompt + completion tokenize as the passage does)."""
    cut = text.rfind(" ", 0, 2 * len(text) // 3)
    return text[:cut], text[cut:]


# ---- the world ----------------------------------------------------------------


def write_world(folder: Path, config: RealTextConfig) -> tuple[Path, Path, Path]:
    """(corpus.jsonl, queries.jsonl, tokenizer folder) in ``folder``, made once."""
    from attribdb.demo.train import train_tokenizer

    corpus, queries, tokenizer_dir = folder / "corpus.jsonl", folder / "queries.jsonl", folder / "tokenizer"
    if corpus.is_file() and queries.is_file() and (tokenizer_dir / "tokenizer.json").is_file():
        return corpus, queries, tokenizer_dir
    folder.mkdir(parents=True, exist_ok=True)
    training, held_out = draw_passages(config)
    if len(training) < config.documents:
        raise RuntimeError(f"only {len(training)} passages from {MAN_SOURCE}; {config.documents} asked for")
    tokenizer = train_tokenizer([text for _, text in training], tokenizer_dir, config.model.vocab_size)
    owners = packages_of([page.path for page, _ in training + held_out])
    docs = [{"id": f"man-{i:05d}", "text": fit_tokens(text, tokenizer, config.max_tokens), "kind": "background",
             "source": page.name} for i, (page, text) in enumerate(training)]
    picked = random.Random(config.seed + 1).sample(held_out, min(config.queries, len(held_out)))
    query_rows = []
    for page, text in picked:
        prompt, completion = as_query(fit_tokens(text, tokenizer, config.max_tokens - 8))
        query_rows.append({"prompt": prompt, "completion": completion, "source": page.name})
    queries.write_text("".join(json.dumps(q, sort_keys=True) + "\n" for q in query_rows))
    text = "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs)
    debian = Path("/etc/debian_version")
    (folder / "SOURCE.json").write_text(json.dumps({
        "source": f"Debian man pages under {MAN_SOURCE}, read by tools/evaluations/manpages.py "
                  f"({', '.join(SKIPPED_FAMILIES)} pages left out)",
        "debian_version": debian.read_text().strip() if debian.is_file() else None,
        "config": asdict(config), "corpus_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "documents": {d["id"]: [str(page.path), owners.get(str(page.path))] for d, (page, _) in zip(docs, training)},
        "queries": [[str(page.path), owners.get(str(page.path))] for page, _ in picked]}, indent=1))
    corpus.write_text(text)  # last: its presence says the world is complete
    return corpus, queries, tokenizer_dir


MAN_SOURCE = "/usr/share/man"


def corpus_tokens(corpus: Path, tokenizer_dir: Path, doc_ids: set[str] | None = None) -> int:
    """Tokens of one training pass over the corpus (or the documents ``doc_ids``), EOS included."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    return sum(len(tokenizer(d["text"])["input_ids"]) + 1 for d in docs if doc_ids is None or d["id"] in doc_ids)


def recipe(config: RealTextConfig, tokens: int) -> DemoModelConfig:
    """The model config that makes ``config.epochs`` passes over a corpus of ``tokens`` tokens."""
    windows = tokens // config.model.seq_length
    return replace(config.model, train_steps=max(1, math.ceil(config.epochs * windows / config.model.batch_size)))


def real_text_world(workdir: Path, config: RealTextConfig = RealTextConfig(), progress: bool = True) -> RealTextWorld:
    """The corpus, its queries and the model trained on every document (all cached in
    ``workdir/realtext-<key>``)."""
    from attribdb.demo.train import train_model

    folder = workdir / f"realtext-{config.key()}"
    corpus, queries, tokenizer_dir = write_world(folder, config)
    model_config = recipe(config, corpus_tokens(corpus, tokenizer_dir))
    model_dir = train_model(corpus, folder / "model", model_config, progress=progress, tokenizer_from=tokenizer_dir)
    rows = [json.loads(line) for line in queries.read_text().splitlines() if line.strip()]
    name = f"real text (GPT-2 {config.model.n_layer}×{config.model.n_embd}, man pages)"
    return RealTextWorld(name, corpus, rows, model_dir, tokenizer_dir, config)


def model_losses(world: RealTextWorld, sample: int = 200) -> dict:
    """What the model learned, per token: its completion loss on training passages made into queries
    the way held-out ones are, on the held-out queries, and the entropy of the corpus's unigram
    distribution (what a model that learned only token frequencies would reach)."""
    from collections import Counter

    from transformers import AutoTokenizer

    from tools.evaluations.lds import mean_losses

    tokenizer = AutoTokenizer.from_pretrained(world.tokenizer_dir)
    docs = [json.loads(line)["text"] for line in world.corpus.read_text().splitlines() if line.strip()]
    training = [as_query(fit_tokens(text, tokenizer, world.config.max_tokens - 8)) for text in docs[:sample]]
    counts = Counter(token for text in docs for token in tokenizer(text)["input_ids"])
    total = sum(counts.values())
    return {"training": mean_losses(world.model_dir, training),
            "held_out": mean_losses(world.model_dir, [(q["prompt"], q["completion"]) for q in world.queries]),
            "unigram": -sum(c / total * math.log(c / total) for c in counts.values())}


def main() -> None:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/cache/lds"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    world = real_text_world(args.workdir, RealTextConfig(seed=args.seed))
    losses = model_losses(world)
    print(f"{world.name}: {len(world.doc_ids)} documents, {len(world.queries)} queries, model in {world.model_dir}")
    print(f"mean completion loss per token: {losses['training']:.3f} on training passages split as queries are, "
          f"{losses['held_out']:.3f} on the held-out queries; a unigram model of the corpus: {losses['unigram']:.3f}")


if __name__ == "__main__":
    main()
