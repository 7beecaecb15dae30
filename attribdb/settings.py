"""Database settings: everything that decides what a database's rows mean.

They are fixed when a database is created and stored in its manifest; later
commands read them back, and an option that contradicts them is refused
rather than silently producing rows that cannot be compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from attribdb.errors import ConfigError
from attribdb.factors import FactorConfig
from attribdb.index_kinds import INDEX_KINDS
from attribdb.row_costs import check_room

DTYPES = ("float32", "float64", "bfloat16", "float16")


def setting(default, help_text: str):
    """A settings field whose help string the CLI shows (options are generated from these)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class DatabaseSettings:
    """Settings of one attribution database (each field is recorded in manifest.json)."""

    model_path: str = field(metadata={"help": "local folder of a Hugging Face causal LM (and its tokenizer)"})
    module_patterns: tuple[str, ...] | None = setting(None, "fnmatch patterns of the layers to track (default: every "
                                                            "linear layer in the transformer blocks)")
    max_length: int = setting(128, "tokens per training sequence (longer documents are split)")
    stride: int | None = setting(None, "step between windows of a long document; None = max_length")
    strategy: str = setting("ekfac", "identity | diagonal | kfac | ekfac")
    fisher: str = setting("true", "true (sampled labels) | empirical")
    damping_factor: float = setting(0.1, "λ = damping_factor × mean eigenvalue, per module")
    damping: float | None = setting(None, "absolute λ, overrides damping_factor")
    fit_sample_size: int = setting(512, "sequences sampled from the corpus to fit the factors")
    fit_seed: int = setting(0, "seeds the fitting sample and the label sampling")
    fit_precision: str = setting("float32", "float32 | bfloat16: the fit's forward/backward under bfloat16 "
                                            "autocast, its eigenvalue correction in bfloat16 and its "
                                            "eigendecompositions in float32 (covariances stay float32); 0.6 of the "
                                            "float32 fit's time on a CPU with bfloat16 units, its rounding 5-8x below "
                                            "the fit's own sampling noise (docs/evidence.md)")
    row_bytes: int = setting(32768, "bytes each training sequence costs on disk, all-in: its row (the largest "
                                    "singular components of its preconditioned gradient, in 4 bits), its index "
                                    "codes and its metadata; the row gets what the others leave (`attribdb plan` "
                                    "prices a budget)")
    index_kind: str = setting("auto", "auto: the rows scanned exactly while the database is small, one "
                                      "database-wide pq4 index of compact codes beyond a size; flat (always scanned) | "
                                      "pq4 (the database index whatever the size)")
    normalized_index: bool = setting(True, "FAISS indexes the rows' sketches over their norms, so candidates come "
                                           "by the cosine the default ranking uses (false: by the raw score)")
    shard_size: int = setting(4096, "rows per shard: the unit of writing and of parallel build")
    commit_rows: int = setting(64, "rows written and committed together (a kill loses at most these)")
    batch_size: int = setting(8, "sequences per forward/backward pass")
    dtype: str = setting("float32", "dtype the model runs in (float32 | float64 | bfloat16 | float16)")

    def __post_init__(self):
        positive = ("max_length", "fit_sample_size", "row_bytes", "shard_size", "commit_rows", "batch_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        check_room(self.row_bytes, self.max_length)
        if self.stride is not None and not 0 < self.stride <= self.max_length:
            raise ConfigError(f"stride must be between 1 and max-length ({self.max_length}), not {self.stride}")
        if self.index_kind not in INDEX_KINDS:
            raise ConfigError(f"unknown index kind {self.index_kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.shard_size % self.commit_rows:
            raise ConfigError(f"shard-size ({self.shard_size}) must be a multiple of commit-rows ({self.commit_rows})")
        _ = self.factor_config  # its __post_init__ validates strategy, fisher and damping

    @property
    def factor_config(self) -> FactorConfig:
        return FactorConfig(strategy=self.strategy, fisher=self.fisher, damping_factor=self.damping_factor,
                            damping=self.damping, seed=self.fit_seed, precision=self.fit_precision)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["module_patterns"] = list(self.module_patterns) if self.module_patterns else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DatabaseSettings":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("module_patterns"):
            values["module_patterns"] = tuple(values["module_patterns"])
        return cls(**values)

    def check_unchanged(self, overrides: dict) -> None:
        """Refuse explicitly given options (None = not given) that differ from these settings."""
        for key, value in overrides.items():
            if value is None:
                continue
            stored = getattr(self, key)
            if isinstance(stored, tuple):
                value = tuple(value)
            if value != stored:
                raise ConfigError(f"this database was created with {key.replace('_', '-')}={stored!r}; "
                                  f"it cannot be changed to {value!r} (build a new database instead)")
