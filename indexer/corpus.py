"""Read documents from a training corpus, streaming and in a deterministic order.

Formats: JSONL, a folder of text files (a document per file), a text file (a
document per line), Parquet, and a Hugging Face ``datasets`` folder saved with
``save_to_disk`` (Arrow files).  Each format is a reader that yields raw
records with where they came from, and a decoder that turns one raw record
into a text and an id; the checks every document must pass are shared.

A malformed record is never dropped silently: it fails the read with its file
and line, or, with ``on_error="skip"``, is counted in the :class:`ReadReport`.
Only the set of ids seen so far is kept, so a corpus of any size streams.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from attribdb.errors import CorpusError

FORMATS = ("auto", "jsonl", "text-files", "text-lines", "parquet", "arrow")
ON_ERROR = ("fail", "skip")
MAX_PROBLEMS = 20  # problem messages a report keeps; the count goes on
BATCH_ROWS = 1024  # Parquet rows decoded at a time
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text-lines"}
FOLDER_FORMATS = ("text-files", "arrow")
DATASET_INFO = "dataset_info.json"  # files `datasets.Dataset.save_to_disk` writes
DATASET_STATE = "state.json"
DATASET_DICT = "dataset_dict.json"  # written by `DatasetDict.save_to_disk`: a folder per split


@dataclass(frozen=True)
class Document:
    doc_id: str
    source: str  # file relative to the corpus path, plus ":line" (or ":row") where a file holds many
    text: str


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus is and how to read it (recorded in the manifest, so a build can be resumed)."""

    path: str = field(metadata={"help": "a corpus file or folder"})
    format: str = field(default="auto", metadata={"help": " | ".join(FORMATS)})
    text_field: str = field(default="text", metadata={"help": "JSONL field or Parquet/Arrow column with the text"})
    id_field: str | None = field(default="id", metadata={
        "help": "field or column with the document id; without it the id is '<file name>:<line or row>'"})
    on_error: str = field(default="fail", metadata={"help": "fail | skip: what a malformed record does"})

    def __post_init__(self):
        if self.format not in FORMATS:
            raise CorpusError(f"unknown corpus format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.on_error not in ON_ERROR:
            raise CorpusError(f"on_error must be one of {', '.join(ON_ERROR)}, not {self.on_error!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise CorpusError(f"text_field must be a non-empty field name, not {self.text_field!r}")
        if self.id_field is not None and (not isinstance(self.id_field, str) or not self.id_field):
            raise CorpusError(f"id_field must be a non-empty field name or None, not {self.id_field!r}")
        if not Path(self.path).exists():
            raise CorpusError(f"corpus {self.path} does not exist")


@dataclass
class ReadReport:
    """What reading and chunking a corpus found; filled in as the documents stream past."""

    documents: int = 0  # documents read and kept
    malformed: int = 0  # records skipped (only ever non-zero with on_error="skip", or for untokenizable text)
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS "file:line: reason" messages
    short_windows: int = 0  # trailing windows dropped by chunking for having fewer than min_length tokens

    def add_problem(self, message: str) -> None:
        self.malformed += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def reject(self, message: str) -> None:
        """A document already counted turned out unusable after all (chunking found no tokens in it)."""
        self.documents -= 1
        self.add_problem(message)

    def summary(self) -> str:
        line = f"read {_count(self.documents, 'document')}"
        if self.malformed:
            line += f", skipped {_count(self.malformed, 'malformed record')} (first: {self.problems[0]})"
        if self.short_windows:
            line += f", dropped {_count(self.short_windows, 'trailing window')} too short to train on"
        return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


class _Malformed(Exception):
    """A record that is not a usable document; the message is the reason, without the place."""


def read_documents(spec: CorpusSpec, report: ReadReport | None = None) -> Iterator[Document]:
    """The documents of the corpus in a fixed order; malformed records fail or are counted per ``spec.on_error``."""
    report = report if report is not None else ReadReport()
    path = Path(spec.path)
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    if path.is_dir() != (fmt in FOLDER_FORMATS):
        wanted = "a folder" if fmt in FOLDER_FORMATS else "a file"
        raise CorpusError(f"corpus format {fmt} reads {wanted}, and {path} is not one")
    records, decode = _READERS[fmt]
    seen_ids: set[str] = set()
    for where, raw in records(path, spec):
        try:
            document = _document(where, *decode(raw, spec), seen_ids)
        except _Malformed as exc:
            if spec.on_error == "fail":
                raise CorpusError(f"{where}: {exc} (fix it, or skip malformed records with "
                                  "on_error='skip' / --on-error skip)") from None
            report.add_problem(f"{where}: {exc}")
            continue
        report.documents += 1
        yield document


def detect_format(path: Path) -> str:
    """The format "auto" stands for: by file suffix, or by what a folder holds."""
    if path.is_file() and path.suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[path.suffix.lower()]
    if path.is_dir():
        if (path / DATASET_INFO).exists() or any(path.glob("*.arrow")):
            return "arrow"
        if (path / DATASET_DICT).exists():
            raise CorpusError(f"{path} holds several dataset splits; pass one of them, e.g. {path / 'train'}")
        if any(path.rglob("*.txt")):
            return "text-files"
    raise CorpusError(f"cannot tell the format of {path}; pass the format (--corpus-format), one of "
                      f"{', '.join(FORMATS[1:])}")


def _document(where: str, text: object, raw_id: object, seen_ids: set[str]) -> Document:
    """The checks every record passes, whatever its format; ``raw_id`` None means "number it by place"."""
    if not isinstance(text, str):
        raise _Malformed(f"the text is {type(text).__name__}, not a string")
    if not text.strip():
        raise _Malformed("the text is empty")
    if raw_id is None:
        doc_id = where
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        doc_id = str(raw_id)
    else:
        raise _Malformed(f"the id {raw_id!r} is not a string or an integer")
    if doc_id in seen_ids:
        raise _Malformed(f"duplicate id {doc_id!r}")
    seen_ids.add(doc_id)
    return Document(doc_id, where, text)


# Decoders: one raw record -> (text, raw id or None); raise _Malformed for a record that cannot be read.

def _fields(record: object, spec: CorpusSpec) -> tuple[object, object]:
    if not isinstance(record, dict):
        raise _Malformed(f"a {type(record).__name__}, not an object")
    if spec.text_field not in record:
        raise _Malformed(f"no {spec.text_field!r} field")
    return record[spec.text_field], record.get(spec.id_field) if spec.id_field else None


def _json_fields(line: bytes, spec: CorpusSpec) -> tuple[object, object]:
    try:
        record = json.loads(line)
    except UnicodeDecodeError:  # a subclass of ValueError, so caught first
        raise _Malformed("not valid UTF-8") from None
    except ValueError as exc:
        raise _Malformed(f"invalid JSON ({getattr(exc, 'msg', exc)})") from None
    return _fields(record, spec)


def _utf8_text(data: bytes, spec: CorpusSpec) -> tuple[str, None]:
    try:
        return data.decode("utf-8-sig"), None  # -sig: a leading byte-order mark is not text
    except UnicodeDecodeError:
        raise _Malformed("not valid UTF-8") from None


# Readers: (where, raw record) in a deterministic order; `where` is also the fallback id.

def _jsonl_lines(path: Path, spec: CorpusSpec) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as handle:  # bytes, so a bad encoding is one malformed line, not a crash
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield f"{path.name}:{number}", line


def _text_lines(path: Path, spec: CorpusSpec) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield f"{path.name}:{number}", line.rstrip(b"\r\n")


def _text_files(path: Path, spec: CorpusSpec) -> Iterator[tuple[str, bytes]]:
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.txt") if p.is_file())
    if not names:
        raise CorpusError(f"{path} holds no .txt files")
    for name in names:
        yield name, (path / name).read_bytes()


def _pyarrow():
    """pyarrow, imported only when a Parquet or Arrow corpus is read (it is an optional dependency)."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise CorpusError("reading parquet needs pyarrow: pip install 'attribdb[parquet]'") from None
    return pyarrow


def _columns(names: list[str], file_name: str, spec: CorpusSpec) -> list[str]:
    """The columns to decode; a missing text column is the spec's mistake, not one bad record per row."""
    if spec.text_field not in names:
        raise CorpusError(f"{file_name} has no column {spec.text_field!r} (it has {', '.join(names)}); "
                          "pass the right one as text_field (--text-field)")
    columns = [spec.text_field]
    if spec.id_field in names and spec.id_field != spec.text_field:
        columns.append(spec.id_field)
    return columns


def _rows(batches: Iterable, columns: list[str], file_name: str) -> Iterator[tuple[str, dict]]:
    number = 0
    for batch in batches:
        for row in batch.select(columns).to_pylist():
            number += 1
            yield f"{file_name}:{number}", row


def _parquet_rows(path: Path, spec: CorpusSpec) -> Iterator[tuple[str, dict]]:
    pyarrow = _pyarrow()
    try:
        parquet = pyarrow.parquet.ParquetFile(str(path))
    except (pyarrow.ArrowException, OSError) as exc:
        raise CorpusError(f"{path.name} cannot be read as Parquet ({exc})") from None
    columns = _columns(parquet.schema_arrow.names, path.name, spec)
    yield from _rows(parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns), columns, path.name)


def _arrow_files(path: Path) -> list[Path]:
    """The shards of a saved ``datasets`` folder, in the order ``state.json`` lists them."""
    state = path / DATASET_STATE
    listed = json.loads(state.read_text()).get("_data_files", []) if state.exists() else []
    files = [path / entry["filename"] for entry in listed] or sorted(path.glob("*.arrow"))
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise CorpusError(f"{path} is not a complete saved dataset: "
                          f"{'missing ' + ', '.join(missing) if missing else 'no .arrow files'}")
    return files


def _arrow_rows(path: Path, spec: CorpusSpec) -> Iterator[tuple[str, dict]]:
    pyarrow = _pyarrow()
    for file in _arrow_files(path):
        with pyarrow.memory_map(str(file)) as source:
            try:  # `datasets` writes the streaming format; plain Arrow files use the random-access one
                reader = pyarrow.ipc.open_stream(source)
                batches = iter(reader)
            except pyarrow.ArrowInvalid:
                source.seek(0)
                try:
                    reader = pyarrow.ipc.open_file(source)
                except pyarrow.ArrowInvalid as exc:
                    raise CorpusError(f"{file.name} cannot be read as Arrow ({exc})") from None
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            columns = _columns(reader.schema.names, file.name, spec)
            yield from _rows(batches, columns, file.name)


_READERS: dict[str, tuple[Callable, Callable]] = {  # format -> (reader, decoder)
    "jsonl": (_jsonl_lines, _json_fields),
    "text-files": (_text_files, _utf8_text),
    "text-lines": (_text_lines, _utf8_text),
    "parquet": (_parquet_rows, _fields),
    "arrow": (_arrow_rows, _fields),
}
