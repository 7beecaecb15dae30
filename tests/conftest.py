"""Fixtures: a tiny local causal LM folder (tokenizer built offline) and small corpora."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest

RAM_DISK = Path("/dev/shm")


def pytest_configure(config):
    """Temporary databases in memory where the system has a RAM file system and TMPDIR does not
    say otherwise.  A full run writes and deletes hundreds of databases of many small files each
    (when rows were a file each, some 250,000 files), which on an ext4 disk mounted with discard
    took longer than the tests."""
    if "TMPDIR" not in os.environ and RAM_DISK.is_dir() and os.access(RAM_DISK, os.W_OK | os.X_OK):
        tempfile.tempdir = str(RAM_DISK)


WORDS = ("the cat dog bird sat ran flew over under near house tree river stone red blue green small large "
         "quick slow old young capital city founded year colour bright dark north south east west").split()


def write_corpus(path: Path, n_docs: int, seed: int = 0, start: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(start, start + n_docs):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 40))]
            handle.write(json.dumps({"id": f"doc{i}", "text": " ".join(words) + "."}) + "\n")
    return path


def write_tokenizer(folder: Path):
    """A small byte-level BPE tokenizer trained offline on WORDS, saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def make_model_folder(folder: Path, seed: int = 0, width: int = 32, layers: int = 2) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    fast = write_tokenizer(folder)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=width, n_layer=layers, n_head=2,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("model") / "tiny-gpt2")


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("model") / "other-gpt2", seed=1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", 90)


@pytest.fixture(scope="session")
def built_db(tmp_path_factory, corpus, model_dir) -> Path:
    """A small complete database (many shards); tests that damage it work on a copy (dbtools.copy_db)."""
    from dbtools import SMALL_SETTINGS, cli

    db = tmp_path_factory.mktemp("built") / "db"
    built = cli("build", db, "--corpus", corpus, "--model", model_dir, "--quiet", *SMALL_SETTINGS)
    assert built.stderr == "", f"--quiet leaves stderr empty (third-party warnings included):\n{built.stderr}"
    return db
