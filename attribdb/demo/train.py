"""Train the demo's tokenizer and tiny GPT-2 from scratch on the CPU, offline, reproducibly.

Fact documents are short and few, so the training stream repeats them
(``fact_repeats``) among the background text: a tiny model must see a fact
many times to learn it.  Not too many: a model that drives its training loss
on the fact documents to zero leaves them no gradient, and influence then
points at whatever it still gets wrong (900 steps with 30 repeats put no fact
document in the top 30; 600 with 16 completes 54 of the 60 held-out prompts
and puts the stating documents first).  The database is built over the corpus as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attribdb.models import quiet_transformers

EOS = "<|endoftext|>"
CACHE_FILE = "demo_model.json"


@dataclass(frozen=True)
class DemoModelConfig:
    vocab_size: int = 4096
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    seq_length: int = 128  # training window in tokens
    batch_size: int = 16
    train_steps: int = 600
    learning_rate: float = 3e-3
    fact_repeats: int = 16  # times each fact document appears in one pass over the corpus
    seed: int = 0


def read_corpus(corpus_jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in corpus_jsonl.read_text().splitlines() if line.strip()]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int):
    """A byte-level BPE trained on the corpus, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out_dir)
    return fast


def _fingerprint(corpus_jsonl: Path, config: DemoModelConfig) -> dict:
    return {"config": asdict(config), "corpus_sha256": hashlib.sha256(corpus_jsonl.read_bytes()).hexdigest()}


def _token_stream(docs: list[dict], tokenizer, config: DemoModelConfig, rng: random.Random) -> list[int]:
    """One pass: every document once, fact documents ``fact_repeats`` times, shuffled, EOS-separated."""
    encoded = {d["id"]: tokenizer(d["text"])["input_ids"] for d in docs}
    order = [d["id"] for d in docs for _ in range(config.fact_repeats if d.get("kind") == "fact" else 1)]
    rng.shuffle(order)
    stream: list[int] = []
    for doc_id in order:
        stream += encoded[doc_id] + [tokenizer.eos_token_id]
    return stream


def train_model(corpus_jsonl: Path, out_dir: Path, config: DemoModelConfig = DemoModelConfig(),
                progress: bool = True, tokenizer_from: Path | None = None,
                checkpoints: tuple[int, ...] = ()) -> Path:
    """Train (or reuse, when config and corpus match) the demo model in ``out_dir``.

    ``tokenizer_from`` reuses another model's tokenizer instead of training one,
    so models trained on different subsets of a corpus stay comparable.
    ``checkpoints``: steps after which the model so far is also saved, with the
    tokenizer, as ``out_dir/checkpoint-STEP``: influence summed over training
    sees the fact documents before the model has memorised them.  Saving
    consumes no randomness, so the final model is the one trained without them.
    Each checkpoint and the final model record their step and learning rate as
    attribdb's Trainer callback does (``--checkpoint-weights lr`` reads them).
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from attribdb.indexer.checkpoints import record

    quiet_transformers()  # its config notices and 'Writing model shards' bar: our own progress says enough
    fingerprint = _fingerprint(corpus_jsonl, config)
    if tokenizer_from is not None:
        fingerprint["tokenizer_from"] = str(tokenizer_from)
    if checkpoints:  # only when asked for: models trained before checkpoints existed stay valid
        fingerprint["checkpoints"] = sorted(checkpoints)
        fingerprint["recorded"] = "step and learning rate"  # runs saved before the records are made again
    cache = out_dir / CACHE_FILE
    if cache.is_file() and json.loads(cache.read_text()) == fingerprint:
        return out_dir
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    docs = read_corpus(corpus_jsonl)
    if tokenizer_from is None:
        tokenizer = train_tokenizer([d["text"] for d in docs], work, config.vocab_size)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        tokenizer.save_pretrained(work)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    warmup = max(1, config.train_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, config.train_steps) / config.train_steps)))
    windows: list[list[int]] = []
    model.train()
    bar = tqdm(range(config.train_steps), desc="train demo model", file=sys.stderr, disable=not progress)
    for step in bar:
        batch = []
        while len(batch) < config.batch_size:
            if not windows:
                stream = _token_stream(docs, tokenizer, config, rng)
                windows = [stream[i:i + config.seq_length] for i in range(0, len(stream) - config.seq_length,
                                                                           config.seq_length)]
                rng.shuffle(windows)
            batch.append(windows.pop())
        ids = torch.tensor(batch)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        learning_rate = optimizer.param_groups[0]["lr"]  # the one this step trained with
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step + 1 in checkpoints:
            model.eval().save_pretrained(work / f"checkpoint-{step + 1}")
            tokenizer.save_pretrained(work / f"checkpoint-{step + 1}")
            record(work / f"checkpoint-{step + 1}", step + 1, learning_rate)
            model.train()
    model.eval().save_pretrained(work)
    record(work, config.train_steps, learning_rate)
    (work / CACHE_FILE).write_text(json.dumps(fingerprint))
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)  # a killed run leaves only the .partial folder, never a model that looks complete
    return out_dir


def known_facts(model_dir: Path, facts) -> list[bool]:
    """Per fact, whether its held-out prompt greedily decodes to exactly the fact's value."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    known = []
    for fact in facts:
        prompt = tokenizer(fact.prompt)["input_ids"]
        target = tokenizer(fact.completion)["input_ids"]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in target:
                next_id = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        known.append(ids[0, len(prompt):].tolist() == target)
    return known


def fact_accuracy(model_dir: Path, facts) -> float:
    known = known_facts(model_dir, facts)
    return sum(known) / len(known)
