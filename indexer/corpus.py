"""Read documents from a training corpus, streaming and in a deterministic order.

Formats: JSONL, a folder of text files (a document per file), a text file (a
document per line), Parquet, and a Hugging Face ``datasets`` folder saved with
``save_to_disk`` (Arrow files).  A malformed record is never dropped silently:
it fails the read with its file and line, or, with ``on_error="skip"``, is
counted in the :class:`ReadReport`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from attribdb.errors import CorpusError

FORMATS = ("auto", "jsonl", "text-files", "text-lines", "parquet", "arrow")
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Document:
    doc_id: str
    source: str  # the file (and line or record) it came from
    text: str


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus is and how to read it (recorded in the manifest)."""

    path: str
    format: str = "auto"
    text_field: str = "text"
    id_field: str | None = "id"
    on_error: str = "fail"  # fail | skip

    def __post_init__(self):
        if self.format not in FORMATS:
            raise CorpusError(f"unknown corpus format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.on_error not in ("fail", "skip"):
            raise CorpusError(f"on_error must be 'fail' or 'skip', not {self.on_error!r}")
        if not Path(self.path).exists():
            raise CorpusError(f"corpus {self.path} does not exist")


@dataclass
class ReadReport:
    documents: int = 0
    malformed: int = 0
    problems: list[str] = field(default_factory=list)

    def add_problem(self, message: str) -> None:
        self.malformed += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def summary(self) -> str:
        line = f"read {self.documents} documents"
        if self.malformed:
            line += f", skipped {self.malformed} malformed records (first: {self.problems[0]})"
        return line


def detect_format(path: Path) -> str:
    if path.is_file():
        by_suffix = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text-lines"}
        if path.suffix in by_suffix:
            return by_suffix[path.suffix]
    elif path.is_dir():
        if (path / "dataset_info.json").exists() or any(path.glob("*.arrow")):
            return "arrow"
        if any(path.rglob("*.txt")):
            return "text-files"
    raise CorpusError(f"cannot tell the format of {path}; pass --corpus-format")


def read_documents(spec: CorpusSpec, report: ReadReport | None = None) -> Iterator[Document]:
    """Documents of the corpus; malformed records fail or are counted per ``spec.on_error``."""
    report = report if report is not None else ReadReport()
    path = Path(spec.path)
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    records = {"jsonl": _jsonl_records, "text-files": _text_file_records, "text-lines": _text_line_records,
               "parquet": _parquet_records, "arrow": _arrow_records}[fmt](path, spec)
    seen_ids: set[str] = set()
    for where, record in records:
        try:
            document = _document(where, record, spec, seen_ids)
        except ValueError as exc:
            if spec.on_error == "fail":
                raise CorpusError(f"{where}: {exc} (pass --on-error skip to skip such records)") from None
            report.add_problem(f"{where}: {exc}")
            continue
        seen_ids.add(document.doc_id)
        report.documents += 1
        yield document


def _document(where: str, record, spec: CorpusSpec, seen_ids: set[str]) -> Document:
    """Validate one record (a dict, or a plain string for text formats)."""
    if isinstance(record, ValueError):
        raise record
    if isinstance(record, str):
        text, doc_id = record, where
    else:
        if not isinstance(record, dict):
            raise ValueError("the record is not an object")
        if spec.text_field not in record:
            raise ValueError(f"no {spec.text_field!r} field")
        text = record[spec.text_field]
        raw_id = record.get(spec.id_field) if spec.id_field else None
        if raw_id is None:
            doc_id = where
        elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
            doc_id = str(raw_id)
        else:
            raise ValueError(f"the id {raw_id!r} is not a string or an integer")
    if not isinstance(text, str):
        raise ValueError(f"the {spec.text_field!r} field is not a string")
    if not text.strip():
        raise ValueError("the text is empty")
    if doc_id in seen_ids:
        raise ValueError(f"duplicate document id {doc_id!r}")
    return Document(doc_id, where, text)


def _jsonl_records(path: Path, spec: CorpusSpec):
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, ValueError(f"invalid JSON ({exc.msg})")  # reported like any bad record


def _text_file_records(path: Path, spec: CorpusSpec):
    for file in sorted(p for p in path.rglob("*.txt") if p.is_file()):
        yield str(file.relative_to(path)), file.read_text(encoding="utf-8", errors="replace")


def _text_line_records(path: Path, spec: CorpusSpec):
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield f"{path.name}:{number}", line.rstrip("\n")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise CorpusError("reading Parquet or Arrow needs pyarrow: pip install 'attribdb[parquet]'") from None
    return pyarrow


def _table_rows(batches, name: str):
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield f"{name}:{number}", row


def _parquet_records(path: Path, spec: CorpusSpec):
    pyarrow = _pyarrow()
    yield from _table_rows(pyarrow.parquet.ParquetFile(str(path)).iter_batches(batch_size=1024), path.name)


def _arrow_files(path: Path) -> list[Path]:
    state = path / "state.json"
    if state.exists():
        files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        if files:
            return files
    return sorted(path.glob("*.arrow"))


def _arrow_records(path: Path, spec: CorpusSpec):
    pyarrow = _pyarrow()
    for file in _arrow_files(path):
        with pyarrow.memory_map(str(file)) as source:
            try:
                reader = pyarrow.ipc.open_stream(source)
            except pyarrow.ArrowInvalid:
                reader = pyarrow.ipc.open_file(source)
                reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
            yield from _table_rows(reader, file.name)
