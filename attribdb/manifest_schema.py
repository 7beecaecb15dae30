"""What a manifest.json may contain, checked before anything trusts it.

A manifest decides which files a query opens and how many: a key that fell
back to its default, a shard count of 10**9 or a row block of 7 where 8 were built
used to pass unnoticed, or make a query allocate until it was killed.  The
manifest carries a sha256 of its own canonical JSON, so an edit by hand is
caught by the checksum; the schema catches what a checksum cannot (a manifest
written by a buggy or foreign program) and names the key at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import fields

from attribdb.errors import StoreError
from attribdb.index_kinds import DATABASE_KINDS

CHECKSUM_KEY = "checksum"
STATES = ("building", "complete")
LEGACY_OPTIONAL_SETTINGS = {"normalized_index"}  # absent in databases made before the setting existed


def digest(body: dict) -> str:
    """sha256 of the canonical JSON of a manifest without its checksum."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, problem: str):
        raise StoreError(f"{self.where}: {key} {problem}")

    def keys(self, data, key: str, required: set[str], optional: set[str] = frozenset()) -> dict:
        if not isinstance(data, dict):
            self.fail(key or "the manifest", f"must be an object, not {type(data).__name__}")
        prefix = f"{key}." if key else ""
        unknown = sorted(set(data) - required - set(optional))
        if unknown:
            self.fail(prefix + unknown[0], "is not a manifest key this attribdb knows (written by a newer attribdb, "
                                           "or edited by hand?): upgrade attribdb, or build the database again")
        missing = sorted(required - set(data))
        if missing:
            self.fail(prefix + missing[0], "is missing")
        return data

    def integer(self, value, key: str, minimum: int = 0, none: bool = False):
        if value is None and none:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, not {value!r}")
        if value < minimum:
            self.fail(key, f"must be at least {minimum}, not {value}")

    def string(self, value, key: str, none: bool = False, choices: tuple[str, ...] | None = None):
        if value is None and none:
            return
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {value!r}")
        if choices and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, not {value!r}")

    def typed(self, value, key: str, annotation: str):
        """A settings value against its dataclass annotation (a string under postponed evaluation)."""
        none = annotation.endswith("| None")
        base = annotation.removesuffix(" | None")
        if value is None and none:
            return
        if base == "int":
            self.integer(value, key, minimum=-(1 << 62))
        elif base == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self.fail(key, f"must be a finite number, not {value!r}")
        elif base == "bool":
            if not isinstance(value, bool):
                self.fail(key, f"must be true or false, not {value!r}")
        elif base == "str":
            self.string(value, key)
        elif base.startswith("tuple[str"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.fail(key, f"must be a list of strings, not {value!r}")
        else:  # a new settings type: teach this checker about it
            raise AssertionError(f"no manifest check for settings type {annotation}")


def check(data, where: str) -> dict:
    """The manifest body (checksum removed) once every key is known, typed and in range."""
    from attribdb.settings import DatabaseSettings

    c = _Checker(where)
    c.keys(data, "", {"format_version", "created", "model", "settings", "modules", "rows", "generations",
                      "factor_digests", CHECKSUM_KEY},
           {"block_coverage", "database_index", "checkpoints"})  # absent: made before coverage was measured; no
    # database index; one model (not a trajectory)
    body = {k: v for k, v in data.items() if k != CHECKSUM_KEY}
    if data[CHECKSUM_KEY] != digest(body):
        raise StoreError(f"{where} fails its checksum: it was edited or damaged (restore it from a backup)")
    c.integer(data["format_version"], "format_version")
    c.string(data["created"], "created")
    model = c.keys(data["model"], "model", {"path", "fingerprint", "tokenizer"})
    for key in model:
        c.string(model[key], f"model.{key}")

    settings_fields = {f.name: str(f.type) for f in fields(DatabaseSettings)}
    settings = c.keys(data["settings"], "settings", set(settings_fields) - LEGACY_OPTIONAL_SETTINGS,
                      LEGACY_OPTIONAL_SETTINGS)
    for key, value in settings.items():
        c.typed(value, f"settings.{key}", settings_fields[key])

    if not isinstance(data["modules"], list) or not data["modules"]:
        c.fail("modules", "must be a non-empty list")
    for i, module in enumerate(data["modules"]):
        c.keys(module, f"modules[{i}]", {"name", "d_in", "d_out", "has_bias"})
        c.string(module["name"], f"modules[{i}].name")
        c.integer(module["d_in"], f"modules[{i}].d_in", minimum=1)
        c.integer(module["d_out"], f"modules[{i}].d_out", minimum=1)
        if not isinstance(module["has_bias"], bool):
            c.fail(f"modules[{i}].has_bias", "must be true or false")
    _check_rows(c, data["rows"], [m["name"] for m in data["modules"]], "rows")
    coverage = data.get("block_coverage")
    if coverage is not None and (isinstance(coverage, bool) or not isinstance(coverage, (int, float))
                                 or not 0 <= coverage <= 1):
        c.fail("block_coverage", f"must be a share between 0 and 1 or null, not {coverage!r}")
    _check_digests(c, data["factor_digests"], "factor_digests")
    if data["factor_digests"] and data["rows"] is None:
        c.fail("rows", "is null although the factors were fitted (their digests are recorded)")
    _check_generations(c, data["generations"], settings.get("shard_size"))
    shards = sum(g["shards"] or 0 for g in data["generations"])
    _check_database_index(c, data.get("database_index"), shards, "database_index")
    _check_checkpoints(c, data.get("checkpoints"), [m["name"] for m in data["modules"]], shards)
    return body


def _check_checkpoints(c: _Checker, checkpoints, module_names: list[str], shards: int) -> None:
    """A trajectory database's models (manifest.Checkpoint): at least two, unique names, a step
    or null, a finite weight of at least 0; the first records name, step and weight only (the
    manifest's own model), each other its model, row layout, factor digests and database index."""
    if checkpoints is None:
        return
    if not isinstance(checkpoints, list) or len(checkpoints) < 2:
        c.fail("checkpoints", "must be a list of at least two checkpoints")
    names = set()
    for i, entry in enumerate(checkpoints):
        key = f"checkpoints[{i}]"
        base = {"name", "step", "weight"}
        c.keys(entry, key, base if i == 0 else base | {"model_path", "model_fingerprint", "rows", "factor_digests",
                                                       "database_index"})
        c.string(entry["name"], f"{key}.name")
        if entry["name"] in names:
            c.fail(f"{key}.name", f"repeats {entry['name']!r}")
        names.add(entry["name"])
        c.integer(entry["step"], f"{key}.step", none=True)
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            c.fail(f"{key}.weight", f"must be a finite number of at least 0, not {weight!r}")
        if i:
            c.string(entry["model_path"], f"{key}.model_path")
            c.string(entry["model_fingerprint"], f"{key}.model_fingerprint")
            _check_rows(c, entry["rows"], module_names, f"{key}.rows")
            _check_digests(c, entry["factor_digests"], f"{key}.factor_digests")
            _check_database_index(c, entry["database_index"], shards, f"{key}.database_index")


def _check_digests(c: _Checker, digests, key: str) -> None:
    if not isinstance(digests, dict):
        c.fail(key, "must be an object")
    for name, value in digests.items():
        if not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
            c.fail(f"{key}.{name}", f"must be a sha256 in hex, not {value!r}")


def _check_database_index(c: _Checker, recorded, shards: int, key: str) -> None:
    """The database-wide FAISS index (attribdb/db_index.py): a file name without a path, its CRC32C,
    and the shards it covers, every one of them in a generation."""
    if recorded is None:
        return
    c.keys(recorded, key, {"kind", "file", "crc32c", "shards", "rows", "trained_on"})
    c.string(recorded["kind"], f"{key}.kind", choices=DATABASE_KINDS)
    if not (isinstance(recorded["file"], str) and re.fullmatch(r"[\w.-]+\.faiss", recorded["file"])):
        c.fail(f"{key}.file", f"must be a file name ending in .faiss, not {recorded['file']!r}")
    if not (isinstance(recorded["crc32c"], str) and re.fullmatch(r"[0-9a-f]{8}", recorded["crc32c"])):
        c.fail(f"{key}.crc32c", f"must be a CRC32C in hex, not {recorded['crc32c']!r}")
    covered = recorded["shards"]
    if not (isinstance(covered, list) and covered and all(isinstance(s, int) and not isinstance(s, bool)
                                                          and 0 <= s < shards for s in covered)
            and covered == sorted(set(covered))):
        c.fail(f"{key}.shards", f"must be a sorted list of shard numbers below {shards}")
    for name in ("rows", "trained_on"):
        c.integer(recorded[name], f"{key}.{name}", minimum=1)


def _check_rows(c: _Checker, rows, module_names: list[str], key: str) -> None:
    """The row layout (rows.RowLayout.to_dict): null until the fit has written it, then one
    (k_out, k_in) subspace and one sketch width, all positive, per tracked module, and nothing else."""
    if rows is None:
        return
    c.keys(rows, key, {"format", "subspaces", "payload_bytes", "sketch_widths", "kept", "normalized_index"})
    c.string(rows["format"], f"{key}.format", choices=("lowrank-int4",))
    if not isinstance(rows["normalized_index"], bool):
        c.fail(f"{key}.normalized_index", "must be true or false")
    c.integer(rows["payload_bytes"], f"{key}.payload_bytes", minimum=1)
    for name, subspace in c.keys(rows["subspaces"], f"{key}.subspaces", set(module_names)).items():
        if not (isinstance(subspace, list) and len(subspace) == 2):
            c.fail(f"{key}.subspaces.{name}", f"must be a pair [k_out, k_in], not {subspace!r}")
        for k in subspace:
            c.integer(k, f"{key}.subspaces.{name}", minimum=1)
    for name, width in c.keys(rows["sketch_widths"], f"{key}.sketch_widths", set(module_names)).items():
        c.integer(width, f"{key}.sketch_widths.{name}", minimum=1)
    kept = rows["kept"]
    if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not math.isfinite(kept):
        c.fail(f"{key}.kept", f"must be a finite number, not {kept!r}")


def _check_generations(c: _Checker, generations, shard_size) -> None:
    if not isinstance(generations, list):
        c.fail("generations", "must be a list")
    next_shard, building = 0, 0
    for i, g in enumerate(generations):
        key = f"generations[{i}]"
        c.keys(g, key, {"corpus", "first_shard", "state", "shards", "sequences", "documents", "malformed"},
               {"fingerprint"})
        if not isinstance(g["corpus"], dict) or not isinstance(g["corpus"].get("path"), str):
            c.fail(f"{key}.corpus", "must be an object with a path")
        c.string(g["state"], f"{key}.state", choices=STATES)
        c.string(g.get("fingerprint"), f"{key}.fingerprint", none=True)
        c.integer(g["first_shard"], f"{key}.first_shard")
        if g["first_shard"] != next_shard:
            c.fail(f"{key}.first_shard", f"is {g['first_shard']}; the shards before it end at {next_shard}")
        for name in ("shards", "sequences"):
            c.integer(g[name], f"{key}.{name}", minimum=1, none=g["state"] == "building")
        for name in ("documents", "malformed"):
            c.integer(g[name], f"{key}.{name}", none=name == "documents")
        if g["sequences"] is not None and isinstance(shard_size, int) and shard_size > 0:
            expected = math.ceil(g["sequences"] / shard_size)
            if g["shards"] != expected:
                c.fail(f"{key}.shards", f"is {g['shards']}, but {g['sequences']} sequences in shards of "
                                        f"{shard_size} make {expected}")
        next_shard += g["shards"] or 0
        building += g["state"] == "building"
    if building > 1:
        c.fail("generations", f"has {building} unfinished builds; there can be at most one")
