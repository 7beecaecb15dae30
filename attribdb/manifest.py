"""manifest.json: what a database is, what made it, and which shards it holds.

Written atomically (temporary file, fsync, rename) by one process only, so a
reader always sees a whole manifest.  Rows themselves are committed in each
shard's LMDB; the manifest lists the shards and their state.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from attribdb import manifest_schema
from attribdb.errors import ConfigError, ModelMismatchError, StoreError
from attribdb.layout import FORMAT_VERSION, MANIFEST, factor_files
from attribdb.rows import RowLayout
from attribdb.settings import DatabaseSettings
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
    fingerprint: str | None = None  # sha256 of the corpus's sequence stream (attribdb.indexer.sequences.plan)

    @property
    def shard_ids(self) -> range:
        return range(self.first_shard, self.first_shard + (self.shards or 0))


@dataclass
class Checkpoint:
    """One model of a training run in a trajectory database, whose influence a query sums.

    Checkpoint 0 is the database's model: its path, fingerprint, row layout, factor digests and
    database index are the manifest's own, so a single-model database is a trajectory of one and
    reads as it always did.  Checkpoint c ≥ 1 records its own here (same architecture, tracked
    modules and settings; its own factors, rows and index)."""

    name: str  # unique in the database: the model folder's name (checkpoint-200)
    step: int | None  # the training step, when known
    weight: float  # its factor in the sum (1, or its learning rate: --checkpoint-weights)
    model_path: str | None = None
    model_fingerprint: str | None = None
    rows: dict | None = None
    factor_digests: dict[str, str] = field(default_factory=dict)
    database_index: dict | None = None

    OWN = ("model_path", "model_fingerprint", "rows", "factor_digests", "database_index")  # what c ≥ 1 records

    def to_dict(self, first: bool) -> dict:
        data = {"name": self.name, "step": self.step, "weight": self.weight}
        return data if first else data | {key: getattr(self, key) for key in self.OWN}


@dataclass
class Manifest:
    settings: DatabaseSettings
    model_fingerprint: str
    tokenizer_path: str
    modules: list[TrackedModule]
    rows: dict | None = None  # the row layout (rows.RowLayout.to_dict), chosen when the factors are fitted
    generations: list[Generation] = field(default_factory=list)
    factor_digests: dict[str, str] = field(default_factory=dict)  # factors/ file name -> sha256, once fitted
    block_coverage: float | None = None  # share of block parameters tracked; None in databases made before it
    database_index: dict | None = None  # the database-wide FAISS index (attribdb/db_index.py), once there is one
    checkpoints: list[Checkpoint] = field(default_factory=list)  # a trajectory database's models; [] = one model
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def shard_ids(self) -> list[int]:
        return [s for g in self.generations for s in g.shard_ids]

    @property
    def model_path(self) -> str:
        return self.settings.model_path

    @property
    def checkpoint_count(self) -> int:
        return max(1, len(self.checkpoints))

    def holder(self, checkpoint: int = 0):
        """What records checkpoint ``checkpoint``'s model, rows, factor digests and database index
        (attributes ``model_path``, ``model_fingerprint``, ``rows``, ``factor_digests``,
        ``database_index``): the manifest itself for checkpoint 0, its Checkpoint entry after."""
        return self.checkpoints[checkpoint] if checkpoint else self

    def checkpoint_names(self) -> list[str]:
        return [c.name for c in self.checkpoints] or [_folder_name(self.model_path)]

    def row_layout(self, checkpoint: int = 0) -> RowLayout:
        rows = self.holder(checkpoint).rows
        if rows is None:
            raise StoreError("this database has no row layout yet: its factors were never fitted; "
                             "run `attribdb build` (or `attribdb fit`) again")
        return RowLayout.from_dict(self.modules, rows)

    def building(self) -> Generation | None:
        return next((g for g in self.generations if g.state == "building"), None)

    def next_shard_id(self) -> int:
        return max((g.first_shard + (g.shards or 0) for g in self.generations), default=0)

    def require_model(self, fingerprint: str, checkpoint: int = 0) -> None:
        holder = self.holder(checkpoint)
        if fingerprint != holder.model_fingerprint:
            which = f"checkpoint {self.checkpoints[checkpoint].name} of " if checkpoint else ""
            raise ModelMismatchError(
                f"the model's weights (fingerprint {fingerprint[:12]}) differ from the model {which}this database "
                f"was built with ({holder.model_fingerprint[:12]}, {holder.model_path}); "
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
            "factor_digests": self.factor_digests,
        } | ({"database_index": self.database_index} if self.database_index else {}) \
          | ({"checkpoints": [c.to_dict(i == 0) for i, c in enumerate(self.checkpoints)]} if self.checkpoints else {})

    def record_factor_files(self, root: Path, checkpoint: int = 0) -> None:
        """Record the sha256 of every factor file: they become one unit, checked on every load."""
        self.holder(checkpoint).factor_digests = {path.name: file_sha256(path)
                                                  for path in factor_files(root, checkpoint)}

    def check_factor_files(self, root: Path, paths: list[Path] | None = None, checkpoint: int = 0) -> None:
        """Refuse factor files of a checkpoint (all of them, or ``paths``) that are missing or differ
        from what the fit wrote."""
        digests = self.holder(checkpoint).factor_digests
        if not digests:
            raise StoreError(f"{root} has no complete factors (a fit was interrupted): run the same "
                             "`attribdb build` or `attribdb fit` command again")
        for path in factor_files(root, checkpoint) if paths is None else paths:
            if not path.is_file():
                raise StoreError(f"{path} is missing: the database is damaged")
            if file_sha256(path) != digests.get(path.name):
                raise StoreError(f"{path} is damaged: its sha256 differs from the one recorded when it was fitted")

    def save(self, root: Path) -> None:
        path = Path(root) / MANIFEST
        tmp = path.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
        body = self.to_dict()
        with open(tmp, "w") as handle:
            json.dump(body | {manifest_schema.CHECKSUM_KEY: manifest_schema.digest(body)}, handle, indent=2)
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
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"{path} is not readable JSON ({exc})") from None
        if isinstance(data, dict) and data.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path} has format version {data.get('format_version')}; this attribdb reads "
                             f"version {FORMAT_VERSION} only: build the database again")
        data = manifest_schema.check(data, str(path))
        try:
            return cls(
                settings=DatabaseSettings.from_dict(data["settings"]),
                model_fingerprint=data["model"]["fingerprint"],
                tokenizer_path=data["model"]["tokenizer"],
                modules=[TrackedModule(**m) for m in data["modules"]],
                rows=data.get("rows"),
                generations=[Generation(**g) for g in data["generations"]],
                factor_digests=data["factor_digests"],
                block_coverage=data.get("block_coverage"),
                database_index=data.get("database_index"),
                checkpoints=[Checkpoint(**c) for c in data.get("checkpoints", [])],
                format_version=data["format_version"],
                created=data["created"],
            )
        except (ConfigError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{path} is damaged: {exc}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_name(path: str) -> str:
    return Path(path).name or str(path)


def exists(root: Path) -> bool:
    return (Path(root) / MANIFEST).is_file()
