"""Corpus readers agree across formats and report malformed records; chunking tiles each document exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from attribdb.errors import ConfigError, CorpusError
from attribdb.indexer import corpus
from attribdb.indexer.chunking import ChunkConfig, chunk_documents
from attribdb.indexer.corpus import CorpusSpec, Document, ReadReport, read_documents

pa = pytest.importorskip("pyarrow")
import pyarrow.ipc  # noqa: E402
import pyarrow.parquet  # noqa: E402

DOCS = [  # (id, text): single lines, so that every format can hold them
    ("d00", "The cat sat on the mat."),
    ("d01", "A river runs  under the old   stone bridge, north to south."),
    ("d02", "Héllo wörld: naïve café, 日本語のテキスト, emoji 🙂 too."),
    ("d03", "x"),
    ("d04", "  leading and trailing spaces  "),
    ("d05", " ".join(["the quick brown fox jumps over the lazy dog"] * 12)),
    ("d06", "tabs\tand\tpunctuation!? (brackets) [more] {braces} -- dashes..."),
]
SENTENCES = ["the cat sat on the mat", "the quick brown fox jumps over the lazy dog",
             "a river runs under the old stone bridge", "héllo wörld naïve café 日本語"] * 10


# ---------------------------------------------------------------- writers: the same documents in every format

def write_jsonl(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in docs),
                    encoding="utf-8")
    return path


def write_text_files(folder: Path, docs=DOCS) -> Path:
    for i, (doc_id, text) in enumerate(docs):
        sub = folder / ("a" if i % 2 else "b")  # nested folders: ids are relative paths, order is by path
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{doc_id}.txt").write_text(text, encoding="utf-8")
    return folder


def write_text_lines(path: Path, docs=DOCS) -> Path:
    path.write_text("\n\n".join(t for _, t in docs) + "\n", encoding="utf-8")  # blank lines in between
    return path


def table(docs=DOCS):
    return pa.table({"id": [i for i, _ in docs], "text": [t for _, t in docs], "other": list(range(len(docs)))})


def write_parquet(path: Path, docs=DOCS) -> Path:
    pyarrow.parquet.write_table(table(docs), path, row_group_size=3)
    return path


def write_dataset_folder(folder: Path, docs=DOCS, shards: int = 2, ipc_format: str = "stream") -> Path:
    """What `datasets.Dataset.save_to_disk` writes: Arrow stream shards, state.json and dataset_info.json."""
    folder.mkdir()
    whole, names = table(docs), []
    per_shard = -(-len(docs) // shards)
    for k in range(shards):
        names.append(f"data-{k:05d}-of-{shards:05d}.arrow")
        opener = pa.ipc.new_stream if ipc_format == "stream" else pa.ipc.new_file
        with opener(str(folder / names[-1]), whole.schema) as writer:
            writer.write_table(whole.slice(k * per_shard, per_shard), max_chunksize=2)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


# ---------------------------------------------------------------- readers

@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(corpus, "BATCH_ROWS", 2)  # Parquet rows then span several batches


@pytest.mark.parametrize("fmt", ["jsonl", "text-files", "text-lines", "parquet", "arrow", "arrow-file"])
def test_every_format_reads_the_same_documents(tmp_path, small_batches, fmt):
    path = {"jsonl": lambda: write_jsonl(tmp_path / "c.jsonl"),
            "text-files": lambda: write_text_files(tmp_path / "texts"),
            "text-lines": lambda: write_text_lines(tmp_path / "c.txt"),
            "parquet": lambda: write_parquet(tmp_path / "c.parquet"),
            "arrow": lambda: write_dataset_folder(tmp_path / "ds"),
            "arrow-file": lambda: write_dataset_folder(tmp_path / "ds", ipc_format="file")}[fmt]()
    report = ReadReport()
    docs = list(read_documents(CorpusSpec(str(path)), report))  # "auto" finds the format
    if fmt == "text-files":  # ordered by relative path, which is the id
        expected = sorted((f"{'a' if i % 2 else 'b'}/{d}.txt", t) for i, (d, t) in enumerate(DOCS))
    elif fmt == "text-lines":  # no ids: numbered by line
        expected = [(f"c.txt:{2 * i + 1}", t) for i, (_, t) in enumerate(DOCS)]
    else:
        expected = DOCS
    assert [(d.doc_id, d.text) for d in docs] == expected
    assert report.documents == len(DOCS) and report.malformed == 0
    assert report.summary() == f"read {len(DOCS)} documents"
    assert docs == list(read_documents(CorpusSpec(str(path), format=fmt.removesuffix("-file"))))


def test_sources_name_file_and_record(tmp_path, small_batches):
    jsonl = [d.source for d in read_documents(CorpusSpec(str(write_jsonl(tmp_path / "c.jsonl"))))]
    parquet = [d.source for d in read_documents(CorpusSpec(str(write_parquet(tmp_path / "c.parquet"))))]
    arrow = [d.source for d in read_documents(CorpusSpec(str(write_dataset_folder(tmp_path / "ds"))))]
    assert jsonl == [f"c.jsonl:{i}" for i in range(1, 8)]
    assert parquet == [f"c.parquet:{i}" for i in range(1, 8)]
    assert arrow == [f"data-00000-of-00002.arrow:{i}" for i in range(1, 5)] + \
                    [f"data-00001-of-00002.arrow:{i}" for i in range(1, 4)]


def test_missing_id_field_numbers_records_by_place(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": null}\n')
    assert [d.doc_id for d in read_documents(CorpusSpec(str(path)))] == ["c.jsonl:1", "c.jsonl:3"]
    parquet = write_parquet(tmp_path / "c.parquet")
    ids = [d.doc_id for d in read_documents(CorpusSpec(str(parquet), id_field=None))]
    assert ids == [f"c.parquet:{i}" for i in range(1, 8)]


def test_arrow_shards_are_read_in_state_json_order(tmp_path):
    folder = write_dataset_folder(tmp_path / "ds", shards=3)
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"].reverse()
    (folder / "state.json").write_text(json.dumps(state))
    texts = [d.text for d in read_documents(CorpusSpec(str(folder)))]
    assert texts == [t for _, t in DOCS[6:]] + [t for _, t in DOCS[3:6]] + [t for _, t in DOCS[:3]]


def write_bad_jsonl(path: Path) -> Path:
    lines = [
        b'{"id": "a", "text": "fine"}',  # 1
        b"",  # 2: blank, ignored
        b"{not json",  # 3
        b"[1, 2]",  # 4: not an object
        b'{"id": "b"}',  # 5: no text
        b'{"id": "c", "text": 5}',  # 6: text not a string
        b'{"id": "d", "text": "  \\n "}',  # 7: empty text
        b'{"id": 1.5, "text": "float id"}',  # 8: bad id type
        b'{"id": "a", "text": "again"}',  # 9: duplicate id
        b'{"id": "e", "text": "caf\xe9"}',  # 10: Latin-1, not UTF-8
        b'{"id": 7, "text": "integer id"}',  # 11
        b'{"text": "no id"}',  # 12
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_skip_counts_and_names_every_malformed_record(tmp_path):
    path = write_bad_jsonl(tmp_path / "data.jsonl")
    report = ReadReport()
    docs = list(read_documents(CorpusSpec(str(path), on_error="skip"), report))
    assert [(d.doc_id, d.source) for d in docs] == [("a", "data.jsonl:1"), ("7", "data.jsonl:11"),
                                                    ("data.jsonl:12", "data.jsonl:12")]
    assert (report.documents, report.malformed) == (3, 8)
    assert [p.split(": ")[0] for p in report.problems] == [f"data.jsonl:{n}" for n in range(3, 11)]
    reasons = " | ".join(report.problems)
    for reason in ("invalid JSON", "not an object", "no 'text' field", "not a string", "the text is empty",
                   "not a string or an integer", "duplicate id 'a'", "not valid UTF-8"):
        assert reason in reasons
    assert report.summary() == "read 3 documents, skipped 8 malformed records (first: data.jsonl:3: invalid JSON " \
                               "(Expecting property name enclosed in double quotes))"


def test_fail_stops_at_the_first_malformed_record_after_streaming_the_good_ones(tmp_path):
    documents = read_documents(CorpusSpec(str(write_bad_jsonl(tmp_path / "data.jsonl"))))
    assert next(documents).doc_id == "a"
    with pytest.raises(CorpusError, match=r"^data\.jsonl:3: invalid JSON .*--on-error skip"):
        next(documents)


def test_report_keeps_the_first_problems_but_counts_all(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("nope\n" * (corpus.MAX_PROBLEMS + 5) + '{"text": "ok"}\n')
    report = ReadReport()
    assert len(list(read_documents(CorpusSpec(str(path), on_error="skip"), report))) == 1
    assert report.malformed == corpus.MAX_PROBLEMS + 5 and len(report.problems) == corpus.MAX_PROBLEMS


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
def test_duplicate_ids_are_caught_across_records_and_files(tmp_path, fmt):
    docs = [("1", "one"), ("2", "two"), ("1", "one again")]
    path = {"jsonl": lambda: write_jsonl(tmp_path / "c.jsonl", docs),
            "parquet": lambda: write_parquet(tmp_path / "c.parquet", docs),
            "arrow": lambda: write_dataset_folder(tmp_path / "ds", docs, shards=3)}[fmt]()
    with pytest.raises(CorpusError, match=r":(3|1): duplicate id '1'"):
        list(read_documents(CorpusSpec(str(path))))
    jsonl = tmp_path / "mixed.jsonl"  # the integer 1 and the string "1" are the same id
    jsonl.write_text('{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n')
    with pytest.raises(CorpusError, match=r"mixed\.jsonl:2: duplicate id '1'"):
        list(read_documents(CorpusSpec(str(jsonl))))


def test_columnar_null_text_is_malformed_and_missing_column_is_an_error(tmp_path):
    path = tmp_path / "c.parquet"
    pyarrow.parquet.write_table(pa.table({"id": ["a", "b"], "text": ["fine", None]}), path)
    report = ReadReport()
    assert len(list(read_documents(CorpusSpec(str(path), on_error="skip"), report))) == 1
    assert report.problems == ["c.parquet:2: the text is NoneType, not a string"]
    with pytest.raises(CorpusError, match=r"c\.parquet has no column 'body' \(it has id, text\)"):
        list(read_documents(CorpusSpec(str(path), text_field="body", on_error="skip")))


def test_user_mistakes_are_corpus_errors(tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match="does not exist"):
        CorpusSpec(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(CorpusError, match="unknown corpus format 'csv'"):
        CorpusSpec(str(tmp_path), format="csv")
    with pytest.raises(CorpusError, match="on_error"):
        CorpusSpec(str(tmp_path), on_error="ignore")
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(CorpusError, match="cannot tell the format"):
        list(read_documents(CorpusSpec(str(tmp_path / "notes.md"))))
    with pytest.raises(CorpusError, match="cannot tell the format"):
        list(read_documents(CorpusSpec(str(tmp_path))))
    with pytest.raises(CorpusError, match="reads a folder"):
        list(read_documents(CorpusSpec(str(tmp_path / "notes.md"), format="text-files")))
    dataset_dict = tmp_path / "dd"
    dataset_dict.mkdir()
    (dataset_dict / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(CorpusError, match="several dataset splits"):
        list(read_documents(CorpusSpec(str(dataset_dict))))
    parquet = write_parquet(tmp_path / "c.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(CorpusError, match=r"reading parquet needs pyarrow: pip install 'attribdb\[parquet\]'"):
        list(read_documents(CorpusSpec(str(parquet))))


# ---------------------------------------------------------------- chunking

def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE whose offsets leave out the space in front of a word."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=16)  # < the longest document


def metaspace_bpe() -> PreTrainedTokenizerFast:
    """SentencePiece style: '▁' marks a word start, unknown characters become <unk>."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request):
    return {"byte-level": byte_level_bpe, "metaspace": metaspace_bpe}[request.param]()


def documents() -> list[Document]:
    multi_line = Document("m", "m.txt", "first line\n\nsecond  line\twith tab\r\nthird, last line\n")
    return [Document(i, f"c.jsonl:{n}", t) for n, (i, t) in enumerate(DOCS, start=1)] + [multi_line]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


@pytest.mark.parametrize("max_length", [1, 4, 7, 1000])
def test_non_overlapping_windows_tile_tokens_and_text(tokenizer, max_length):
    config = ChunkConfig(max_length=max_length, min_length=1)
    sequences = list(chunk_documents(documents(), tokenizer, config))
    retokenized = 0
    for document in documents():
        windows = [s for s in sequences if s.doc_id == document.doc_id]
        assert all(s.source == document.source for s in windows)
        assert [t for s in windows for t in s.token_ids] == ids_of(tokenizer, document.text)
        assert all(0 < len(s.token_ids) <= max_length for s in windows)
        assert all(s.token_span[1] - s.token_span[0] == len(s.token_ids) for s in windows)
        assert all(s.text == document.text[s.char_span[0]:s.char_span[1]] for s in windows)
        cuts = [s.char_span for s in windows]  # contiguous, and covering the whole text
        assert cuts[0][0] == 0 and cuts[-1][1] == len(document.text)
        assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
        assert "".join(s.text for s in windows) == document.text
        retokenized += sum(ids_of(tokenizer, s.text) == list(s.token_ids) for s in windows)
    if max_length == 1000:  # one window per document: its text is the document
        assert retokenized == len(sequences) == len(documents())
    elif max_length > 1 and isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
        # a cut inside a word may merge differently (and SentencePiece would mark a word start there)
        assert retokenized >= 0.85 * len(sequences), (retokenized, len(sequences))


@pytest.mark.parametrize("max_length, stride", [(8, 3), (8, 8), (5, 1), (6, 4)])
def test_strided_windows_overlap_by_max_length_minus_stride(tokenizer, max_length, stride):
    config = ChunkConfig(max_length=max_length, stride=stride, min_length=1)
    sequences = list(chunk_documents(documents(), tokenizer, config))
    for document in documents():
        ids = ids_of(tokenizer, document.text)
        windows = [s for s in sequences if s.doc_id == document.doc_id]
        starts = [s.token_span[0] for s in windows]
        assert starts == list(range(0, len(starts) * stride, stride))
        assert [s.token_span[1] for s in windows] == [min(a + max_length, len(ids)) for a in starts]
        assert windows[-1].token_span[1] == len(ids) and all(s.token_span[1] < len(ids) for s in windows[:-1])
        assert all(list(s.token_ids) == ids[slice(*s.token_span)] for s in windows)
        assert all(s.text == document.text[slice(*s.char_span)] for s in windows)
        for a, b in zip(windows, windows[1:]):  # overlapping tokens, overlapping (ordered) characters
            assert a.token_ids[stride:] == b.token_ids[:len(a.token_ids) - stride]
            assert a.char_span[0] <= b.char_span[0] <= a.char_span[1] <= b.char_span[1]


def test_short_trailing_windows_are_dropped_and_counted(tokenizer):
    docs = documents()
    lengths = [len(ids_of(tokenizer, d.text)) for d in docs]
    config = ChunkConfig(max_length=4, min_length=3)
    report = ReadReport(documents=len(docs))
    sequences = list(chunk_documents(docs, tokenizer, config, report))
    assert all(len(s.token_ids) >= 3 for s in sequences)
    assert report.short_windows == sum(0 < n % 4 < 3 for n in lengths) > 0
    assert len(sequences) == sum(n // 4 + (n % 4 >= 3) for n in lengths)
    assert report.documents == len(docs) and report.malformed == 0
    assert report.summary().endswith(f", dropped {report.short_windows} trailing window"
                                     f"{'s' * (report.short_windows != 1)} too short to train on")


def test_a_document_without_tokens_is_counted_malformed():
    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace("~", "")  # text that normalizes away leaves no tokens
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    docs = [Document("1", "c.jsonl:1", "a b a"), Document("2", "c.jsonl:2", "~ ~~"), Document("3", "c.jsonl:3", "b")]
    report = ReadReport(documents=3)
    sequences = list(chunk_documents(docs, tokenizer, ChunkConfig(max_length=2), report))
    assert [(s.doc_id, s.token_ids, s.text) for s in sequences] == [("1", (0, 1), "a b")]
    assert (report.documents, report.malformed, report.short_windows) == (2, 1, 2)
    assert report.problems == ["c.jsonl:2: the text has no tokens"]


def test_reading_and_chunking_stream_together(tmp_path, caplog, monkeypatch):
    import attribdb.indexer.chunking

    monkeypatch.setattr(attribdb.indexer.chunking, "ENCODE_BATCH", 2)  # documents are tokenized a batch at a time
    tokenizer = byte_level_bpe()
    path = write_jsonl(tmp_path / "c.jsonl", DOCS + [("d00", "duplicate")])
    report = ReadReport()
    spec = CorpusSpec(str(path), on_error="skip")
    sequences = chunk_documents(read_documents(spec, report), tokenizer, ChunkConfig(max_length=16), report)
    first = next(sequences)
    assert (first.doc_id, report.documents) == ("d00", 2)  # one batch read so far, not the corpus
    rest = list(sequences)
    assert len(rest) + 1 == sum(-(-len(ids_of(tokenizer, t)) // 16) for _, t in DOCS) - report.short_windows
    assert report.summary().startswith("read 7 documents, skipped 1 malformed record (first: c.jsonl:8: duplicate")
    assert "longer than the specified maximum" not in caplog.text  # d05 has more than model_max_length tokens


@pytest.mark.parametrize("kwargs", [{"max_length": 0}, {"stride": 0}, {"max_length": 4, "stride": 5},
                                    {"min_length": 0}, {"max_length": 4, "min_length": 5}])
def test_chunk_config_refuses_impossible_settings(kwargs):
    with pytest.raises(ConfigError):
        ChunkConfig(**kwargs)


def test_chunking_needs_a_fast_tokenizer():
    with pytest.raises(ConfigError, match="fast"):
        next(chunk_documents(documents(), object(), ChunkConfig()))
