"""Shared by the benchmarks and evaluations: a GPT-2-sized-down model folder and a corpus, made
locally, and the recall of index answers against the exhaustive ones."""

from __future__ import annotations

import json
import random
import re
import resource
from pathlib import Path


def make_model(folder: Path, corpus_texts: list[str], layers: int = 4, width: int = 128, vocab: int = 2048,
               positions: int = 256) -> Path:
    """A randomly initialised GPT-2 and a BPE tokenizer trained on the corpus (throughput needs no training)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus_texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(fast), n_positions=positions, n_embd=width, n_layer=layers, n_head=4,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def english_paragraphs() -> list[str]:
    """Real English text that ships with Python: the pydoc topic help."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        paragraphs += [" ".join(p.split()) for p in topics[name].split("\n\n") if len(p.split()) > 20]
    return paragraphs


def english_sentences() -> list[str]:
    return [s for p in english_paragraphs() for s in re.split(r"(?<=[.!?])\s+", p) if len(s.split()) >= 4]


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """``n_docs`` documents of 3–12 English sentences drawn at random, deterministic.

    Sentences, not whole paragraphs: the stdlib's 1,100 paragraphs would repeat
    whole sequences many times over in a corpus of 20,000, and identical rows tie
    in every ranking, which makes recall against the exhaustive answer meaningless.
    """
    rng = random.Random(seed)
    sentences = english_sentences()
    with open(path, "w") as handle:
        for i in range(n_docs):
            text = " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 12)))
            handle.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recall(index_results, truth_results, k: int) -> float:
    """Mean share of each ground-truth top-k row (shard, row) that the other answer's top k holds."""
    values = []
    for mine, truth in zip(index_results, truth_results):
        wanted = {(h.shard, h.row) for h in truth.hits[:k]}
        found = {(h.shard, h.row) for h in mine.hits[:k]}
        values.append(len(wanted & found) / len(wanted))
    return sum(values) / len(values)
