"""manifest.json: what a database is, what made it, and which shards it holds.

Written atomically (temporary file, fsync, rename) by one process only, so a
reader always sees a whole manifest.  Rows themselves are committed in each
shard's LMDB; the manifest lists the shards and their state.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from attribdb.errors import ModelMismatchError, StoreError
from attribdb.layout import FORMAT_VERSION, MANIFEST
from attribdb.settings import DatabaseSettings
from attribdb.rows import RowLayout
from attribdb.tracking import TrackedModule


@dataclass
class Generation:
    """One build or append: a corpus turned into consecutive shards."""

    corpus: dict  # the corpus spec, as given
    first_shard: int
    state: str = "building"  # building | complete
    shards: int | None = None  # known once the whole corpus has been read
    sequences: int | None = None
    documents: int | None = None
    malformed: int = 0

    @property
    def shard_ids(self) -> range:
        return range(self.first_shard, self.first_shard + (self.shards or 0))


@dataclass
class Manifest:
    settings: DatabaseSettings
    model_fingerprint: str
    tokenizer_path: str
    modules: list[TrackedModule]
    rows: dict | None = None  # the row layout (rows.RowLayout.to_dict), chosen when the factors are fitted
    generations: list[Generation] = field(default_factory=list)
    block_coverage: float | None = None  # share of block parameters tracked; None in databases made before it
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def shard_ids(self) -> list[int]:
        return [s for g in self.generations for s in g.shard_ids]

    def row_layout(self) -> RowLayout:
        if self.rows is None:
            raise StoreError("this database has no row layout yet: its factors were never fitted; "
                             "run `attribdb build` (or `attribdb fit`) again")
        return RowLayout.from_dict(self.modules, self.rows)

    def building(self) -> Generation | None:
        return next((g for g in self.generations if g.state == "building"), None)

    def next_shard_id(self) -> int:
        return max((g.first_shard + (g.shards or 0) for g in self.generations), default=0)

    def require_model(self, fingerprint: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise ModelMismatchError(
                f"the model's weights (fingerprint {fingerprint[:12]}) differ from the model this database "
                f"was built with ({self.model_fingerprint[:12]}, {self.settings.model_path}); "
                "use that model or build a new database")

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "created": self.created,
            "model": {"path": self.settings.model_path, "fingerprint": self.model_fingerprint,
                      "tokenizer": self.tokenizer_path},
            "settings": self.settings.to_dict(),
            "modules": [asdict(m) for m in self.modules],
            "block_coverage": self.block_coverage,
            "rows": self.rows,
            "generations": [asdict(g) for g in self.generations],
        }

    def save(self, root: Path) -> None:
        path = Path(root) / MANIFEST
        tmp = path.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)

    @classmethod
    def load(cls, root: Path) -> "Manifest":
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise StoreError(f"{root} is not an attribdb database (no {MANIFEST})")
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != FORMAT_VERSION:
                raise StoreError(f"{path} has format version {data.get('format_version')}; this attribdb reads "
                                 f"version {FORMAT_VERSION} only: build the database again")
            return cls(
                settings=DatabaseSettings.from_dict(data["settings"]),
                model_fingerprint=data["model"]["fingerprint"],
                tokenizer_path=data["model"]["tokenizer"],
                modules=[TrackedModule(**m) for m in data["modules"]],
                rows=data.get("rows"),
                generations=[Generation(**g) for g in data["generations"]],
                block_coverage=data.get("block_coverage"),
                format_version=data["format_version"],
                created=data["created"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{path} is damaged: {exc}") from exc


def exists(root: Path) -> bool:
    return (Path(root) / MANIFEST).is_file()
