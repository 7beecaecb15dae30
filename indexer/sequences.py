"""The corpus as a deterministic, numbered stream of training sequences.

Every process (a resumed run, each torchrun rank) reads the same corpus in the
same order, so sequence ``i`` is the same everywhere; shard ``k`` of a build
holds sequences ``[k·S, (k+1)·S)``.  Nothing is held in memory beyond one
document and one shard's worth of token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from attribdb.errors import CorpusError
from attribdb.indexer.chunking import ChunkConfig, TextSequence, chunk_documents
from attribdb.indexer.corpus import CorpusSpec, ReadReport, read_documents
from attribdb.records import RowRecord
from attribdb.settings import DatabaseSettings


@dataclass
class CorpusPlan:
    """What a first, cheap pass over the corpus found: counts and problems."""

    sequences: int
    documents: int
    malformed: int
    summary: str
    fingerprint: str  # sha256 of the sequence stream: what a resumed build must find again


def corpus_spec_dict(spec: CorpusSpec) -> dict:
    """The spec as the manifest records it, with the path made absolute."""
    return {**asdict(spec), "path": str(Path(spec.path).resolve())}


def same_corpus(recorded: dict, spec_dict: dict) -> bool:
    """Whether a recorded generation is this corpus, however its path was spelled.

    Comparing path strings would take ``./c.jsonl`` and ``c.jsonl`` (or a run
    from another folder) for two corpora, and appending would duplicate every row.
    """
    if {**recorded, "path": None} != {**spec_dict, "path": None}:
        return False
    try:
        return os.path.samefile(recorded["path"], spec_dict["path"])
    except OSError:  # a recorded path that no longer exists names nothing here
        return recorded["path"] == spec_dict["path"]


def chunk_config(settings: DatabaseSettings) -> ChunkConfig:
    return ChunkConfig(max_length=settings.max_length, stride=settings.stride)


def stream(spec: CorpusSpec, tokenizer, settings: DatabaseSettings,
           report: ReadReport | None = None) -> Iterator[TextSequence]:
    return chunk_documents(read_documents(spec, report), tokenizer, chunk_config(settings), report)


def plan(spec: CorpusSpec, tokenizer, settings: DatabaseSettings) -> CorpusPlan:
    """Count sequences (and surface malformed records) before any expensive work."""
    report, digest, count = ReadReport(), hashlib.sha256(), 0
    for seq in stream(spec, tokenizer, settings, report):
        count += 1
        digest.update(json.dumps([seq.doc_id, seq.source, seq.text, seq.token_ids]).encode())
    if count == 0:
        raise CorpusError(f"{spec.path}: no training sequences ({report.summary()})")
    return CorpusPlan(count, report.documents, report.malformed, report.summary(), digest.hexdigest())


def sample(spec: CorpusSpec, tokenizer, settings: DatabaseSettings, total: int) -> list[TextSequence]:
    """A seeded uniform sample of ``fit_sample_size`` sequences, in corpus order."""
    size = min(settings.fit_sample_size, total)
    chosen = set(random.Random(settings.fit_seed).sample(range(total), size))
    return [seq for i, seq in enumerate(stream(spec, tokenizer, settings)) if i in chosen]


def row_record(seq: TextSequence, number: int) -> RowRecord:
    """What LMDB keeps of the sequence numbered ``number`` in its corpus stream."""
    return RowRecord(seq.doc_id, seq.source, seq.token_span, seq.char_span, seq.text, seq.token_ids, number)
