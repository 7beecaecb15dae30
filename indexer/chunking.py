"""Tokenize documents and split them into training sequences of bounded length.

Each window keeps where it came from (document, token span, character span),
so a result can show its text and the exact-mode rescoring can recompute its
gradient from the stored token ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from attribdb.errors import ConfigError
from indexer.corpus import Document, ReadReport


@dataclass(frozen=True)
class ChunkConfig:
    max_length: int = 256  # tokens per sequence
    stride: int | None = None  # step between window starts; None = max_length (no overlap)
    min_length: int = 2  # a causal LM needs two tokens for one prediction

    def __post_init__(self):
        if self.max_length <= 0:
            raise ConfigError(f"max-length must be positive, not {self.max_length}")
        if self.stride is not None and not 0 < self.stride <= self.max_length:
            raise ConfigError(f"stride must be between 1 and max-length, not {self.stride}")

    @property
    def step(self) -> int:
        return self.stride or self.max_length


@dataclass(frozen=True)
class TextSequence:
    doc_id: str
    source: str
    token_ids: tuple[int, ...]
    token_span: tuple[int, int]  # [start, end) in the document's tokens
    char_span: tuple[int, int]  # [start, end) in the document's text
    text: str


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets, with no special tokens and no length warning."""
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets


def windows(n_tokens: int, config: ChunkConfig) -> Iterator[tuple[int, int]]:
    start = 0
    while True:
        end = min(start + config.max_length, n_tokens)
        yield start, end
        if end == n_tokens:
            return
        start += config.step


def chunk_documents(documents: Iterable[Document], tokenizer, config: ChunkConfig,
                    report: ReadReport | None = None) -> Iterator[TextSequence]:
    """Sequences of every document, in order; a too-short trailing window is dropped and counted."""
    for document in documents:
        ids, offsets = _encode(tokenizer, document.text)
        if len(ids) < config.min_length:
            if report is not None:
                report.add_problem(f"{document.source}: fewer than {config.min_length} tokens")
            continue
        for start, end in windows(len(ids), config):
            if end - start < config.min_length:
                continue
            char_start, char_end = offsets[start][0], offsets[end - 1][1]
            yield TextSequence(document.doc_id, document.source, tuple(ids[start:end]), (start, end),
                               (char_start, char_end), document.text[char_start:char_end])
