"""Fault injection: how a small database fares against kills, concurrent writers, damaged files and bad input.

Builds a tiny database (a 2-layer GPT-2 and a BPE tokenizer made locally, a
corpus of stdlib English), keeps it as the pristine copy with its answers to a
few queries and a digest of every row it serves, then runs each scenario on a
fresh copy and classifies the outcome:

- survived cleanly: the commands that should work did, with the pristine answers;
- clear error: refused with one ``Error: ...`` line (exit 1, or click's usage message and exit 2 for a
  malformed option), never an answer without the damaged piece;
- traceback or unclear error: a Python traceback, or a refusal that is not one clear line
  (including ``verify`` calling a healthy interrupted build damaged);
- crash without message: killed by a signal (bus error, segfault) or hung;
- silently wrong result: an answer, or a verify "ok", that differs from the pristine database;
- rows lost: a kill or concurrent writers left fewer rows than the corpus has.

Every command runs in a child forked from this process after the heavy imports
(torch, transformers, faiss, zarr), through click's test runner: the same code
path as the ``attribdb`` command, a second instead of five per command.  The
parent never touches a database, so each child starts clean.  Kills use the
``ATTRIBDB_KILL_AT`` points of :mod:`attribdb.faults`.

Run: python -m tools.checks.torture [--workdir /tmp/attribdb-torture] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
from tools.benchutil import english_sentences, make_model

CLASSES = ("survived cleanly", "clear error", "traceback or unclear error", "crash without message",
           "silently wrong result", "rows lost")
OK, CLEAR, UNCLEAR, CRASH, WRONG, LOST = CLASSES
SETTINGS = ["--max-length", "16", "--shard-size", "32", "--commit-rows", "8", "--batch-size", "8",
            "--fit-sample-size", "32", "--row-bytes", "4096"]
QUERIES = [{"prompt": "The default value of the", "completion": " argument is None."},
           {"prompt": "This module provides", "completion": " a way of using operating system functions."},
           {"prompt": "An exception is raised", "completion": " when the object is not callable."}]
CHILD_TIMEOUT = 600


# ---- children ----------------------------------------------------------------

@dataclass
class Child:
    pid: int
    result_path: str

    def running(self) -> bool:
        """Whether the child has not exited yet (it stays waitable for finish)."""
        return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    def finish(self, timeout: float = CHILD_TIMEOUT) -> dict:
        """The child's JSON result, or {"signal": n} when it died, or {"signal": "hung"}."""
        deadline = time.time() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                return {"signal": "hung"}
            time.sleep(0.02)
        try:
            text = Path(self.result_path).read_text()
        finally:
            os.unlink(self.result_path)
        if os.WIFSIGNALED(status):
            return {"signal": os.WTERMSIG(status)}
        return json.loads(text) if text else {"signal": f"exit {os.WEXITSTATUS(status)} without a result"}


def start(work: Callable[[], dict], env: dict | None = None) -> Child:
    """Run ``work`` in a forked child; its dict comes back through a file."""
    handle, path = tempfile.mkstemp(prefix="torture-")
    os.close(handle)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.environ.update(env or {})
            result = work()
        except BaseException as exc:  # a harness bug, reported rather than lost
            result, code = {"harness_error": f"{type(exc).__name__}: {exc}"}, 1
        with open(path, "w") as out:
            json.dump(result, out)
        os._exit(code)
    return Child(pid, path)


def run(work: Callable[[], dict], env: dict | None = None) -> dict:
    return start(work, env).finish()


def cli_work(*args) -> Callable[[], dict]:
    """The `attribdb ARGS` command, as the console script runs it (click's runner keeps the output)."""
    def work() -> dict:
        from click.testing import CliRunner

        from attribdb.cli import main

        result = CliRunner().invoke(main, [str(a) for a in args])
        traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
        return {"exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                "traceback": f"{type(result.exception).__name__}: {result.exception}" if traceback else None}
    return work


def cli(*args, env: dict | None = None) -> dict:
    return run(cli_work(*args), env)


def digest_work(db: Path) -> Callable[[], dict]:
    """What the database serves, read through attribdb's own readers: row counts and a hash per shard."""
    def work() -> dict:
        from attribdb import layout
        from attribdb.errors import AttribdbError
        from attribdb.manifest import Manifest
        from attribdb.shard import ShardReader

        try:
            manifest = Manifest.load(db)
            shards = {}
            for shard_id in manifest.shard_ids:
                reader = ShardReader(layout.shard_dir(db, shard_id), manifest.row_layout())
                try:
                    digest = hashlib.sha256()
                    for name in layout.ROW_ARRAYS:
                        digest.update(reader.read(name).tobytes())
                    records = [record.to_dict() for record in reader.metadata(range(reader.rows))]
                    digest.update(json.dumps(records, sort_keys=True).encode())
                    shards[str(shard_id)] = [reader.rows, digest.hexdigest()]
                finally:
                    reader.close()
            return {"rows": sum(rows for rows, _ in shards.values()), "shards": shards}
        except AttribdbError as exc:
            return {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - any other failure to read is still a detection
            return {"error": f"{type(exc).__name__}: {exc}"}
    return work


# ---- judging -----------------------------------------------------------------

def failed(result: dict) -> str | None:
    """The class of a failed command (crash, traceback, unclear, clear), or None if it exited 0 or 3."""
    if "signal" in result or "harness_error" in result:
        return CRASH if "signal" in result else UNCLEAR
    if result["traceback"]:
        return UNCLEAR
    if result["exit"] in (0, 3):
        return None
    lines = result["stderr"].strip().splitlines()
    if result["exit"] == 2 and lines and lines[-1].startswith("Error: "):  # click's usage error: usage, then the line
        return CLEAR
    return CLEAR if result["exit"] == 1 and len(lines) == 1 and lines[0].startswith("Error: ") else UNCLEAR


def answers(result: dict) -> list:
    """(shard, row, rounded score) of each hit of each query in a JSON query output."""
    objects = [json.loads(line) for line in result["stdout"].strip().splitlines()]
    return [[(h["shard"], h["row"], round(h["score"], 3)) for h in o["hits"]] for o in objects]


@dataclass
class Pristine:
    db: Path
    corpus: Path
    extra: Path
    model: Path
    queries: Path
    answers: list
    digest: dict


@dataclass
class Scenario:
    group: str
    name: str
    run: Callable[[Pristine, Path], tuple[str, str]]  # (class, detail)


@dataclass
class Report:
    rows: list = field(default_factory=list)

    def add(self, scenario: Scenario, outcome: str, detail: str, seconds: float) -> None:
        self.rows.append((scenario.group, scenario.name, outcome, detail))
        print(f"{outcome:28s} {scenario.group:12s} {scenario.name:60s} {seconds:5.1f}s  {detail[:150]}", flush=True)

    def table(self) -> str:
        counts = Counter(outcome for *_, outcome, _ in self.rows)
        groups = sorted({g for g, *_ in self.rows})
        header = f"| outcome | {' | '.join(groups)} | total |\n|---|{'---|' * len(groups)}---|\n"
        body = ""
        for cls in CLASSES:
            per = [sum(1 for g, _, o, _ in self.rows if g == group and o == cls) for group in groups]
            body += f"| {cls} | {' | '.join(map(str, per))} | {counts[cls]} |\n"
        totals = " | ".join(str(sum(1 for g, *_ in self.rows if g == x)) for x in groups)
        return header + body + f"| **scenarios** | {totals} | {len(self.rows)} |"


def judge_damaged(p: Pristine, db: Path) -> tuple[str, str]:
    """A damaged copy: verify and a query must refuse with one line or give the pristine answers."""
    verify = cli("verify", db)
    query = cli("query", db, "--queries", p.queries, "--format", "json", "-k", "5")
    digest = run(digest_work(db))
    for result, what in ((verify, "verify"), (query, "query")):
        cls = failed(result)
        if cls in (CRASH, UNCLEAR):
            return cls, f"{what}: {result.get('signal') or result.get('traceback') or result['stderr'].strip()[:200]}"
    if failed(query) is None:
        if answers(query) != p.answers:
            return WRONG, "query answered differently without an error"
        if failed(verify) is None and "error" not in digest and digest != p.digest:
            return WRONG, "verify ok and the query answered, but the rows served differ from the pristine ones"
        if failed(verify) is None:
            return OK, "harmless: verify ok, same answers" + ("" if "error" not in digest else
                                                               f" (reader refuses: {digest['error'][:80]})")
        return CLEAR, f"verify: {verify['stderr'].strip()[:160]}"
    return CLEAR, f"query: {query['stderr'].strip()[:160]}"


def judge_rebuilt(p: Pristine, db: Path, expected: dict | None = None) -> tuple[str, str]:
    """After kills or concurrent writers and a final re-run: the pristine rows, all of them."""
    expected = expected or p.digest
    verify = cli("verify", db)
    cls = failed(verify)
    if cls is not None or verify["exit"] != 0:
        return cls or UNCLEAR, f"verify after the re-run: {verify.get('stderr', '').strip()[:160] or verify}"
    digest = run(digest_work(db))
    if "error" in digest:
        return UNCLEAR, f"verify ok but the rows cannot be read: {digest['error'][:160]}"
    if digest["rows"] < expected["rows"]:
        return LOST, f"{digest['rows']} of {expected['rows']} rows"
    if digest != expected:
        return WRONG, "rows differ from an uninterrupted build"
    return OK, f"{digest['rows']} rows, identical to an uninterrupted build"


# ---- scenarios ---------------------------------------------------------------

def copy_of(p: Pristine, where: Path) -> Path:
    return Path(shutil.copytree(p.db, where / "db"))


def damage(rel: str, op: str, position: float | None = None) -> Callable[[Pristine, Path], tuple[str, str]]:
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        db = copy_of(p, where)
        target = db / rel
        data = target.read_bytes()
        if op == "flip" and data:
            at = min(int(position * len(data)), len(data) - 1)
            target.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
        elif op == "truncate":
            target.write_bytes(data[:int(position * len(data))])
        elif op == "delete":
            target.unlink()
        return judge_damaged(p, db)
    return scenario


def file_kind(rel: str) -> str:
    kind = re.sub(r"shards/\d+", "shards/N", rel)
    return re.sub(r"/c/[\d/]+$", "/c/<chunk>", kind)


def damage_scenarios(p: Pristine, rng: random.Random, per_kind: int) -> list[Scenario]:
    files = sorted(str(f.relative_to(p.db)) for f in p.db.rglob("*") if f.is_file())
    kinds: dict[str, list[str]] = {}
    for rel in files:
        kinds.setdefault(file_kind(rel), []).append(rel)
    ops = [("flip", 0.0), ("flip", 0.5), ("flip", 0.999999), ("flip", rng.random()), ("flip", rng.random()),
           ("truncate", 0.5), ("truncate", 0.0), ("delete", None)]
    out = []
    for _kind, members in sorted(kinds.items()):
        for rel in rng.sample(members, min(per_kind, len(members))):
            for op, position in ops:
                label = f"{op}{'' if position is None else f'@{position:.2f}'} {rel}"
                out.append(Scenario("damage", label, damage(rel, op, position)))
    return out


def lmdb_edit(shard: int, edit: Callable) -> Callable[[Pristine, Path], tuple[str, str]]:
    """A deliberate edit of a shard's LMDB through LMDB itself (what a byte flip cannot reach cleanly)."""
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        db = copy_of(p, where)

        def work() -> dict:
            import lmdb

            from attribdb import layout

            env = lmdb.open(str(layout.shard_dir(db, shard) / layout.META_LMDB), max_dbs=4)
            with env.begin(write=True) as txn:
                edit(txn, {name: env.open_db(name, txn=txn) for name in
                           (layout.ROWS_DB, layout.DOCS_DB, layout.JOURNAL_DB, layout.INFO_DB)})
            env.close()
            return {}
        run(work)
        return judge_damaged(p, db)
    return scenario


def _row_key(row: int) -> bytes:
    return row.to_bytes(8, "big")


def _replace_in_row(row: int, old: bytes, new: bytes):
    def edit(txn, dbs):
        value = bytes(txn.get(_row_key(row), db=dbs[b"rows"]))
        txn.put(_row_key(row), value.replace(old, new, 1), db=dbs[b"rows"])
    return edit


def _swap_rows(a: int, b: int):
    def edit(txn, dbs):
        va, vb = bytes(txn.get(_row_key(a), db=dbs[b"rows"])), bytes(txn.get(_row_key(b), db=dbs[b"rows"]))
        txn.put(_row_key(a), vb, db=dbs[b"rows"])
        txn.put(_row_key(b), va, db=dbs[b"rows"])
    return edit


def _set_info(key: bytes, value: bytes | None):
    def edit(txn, dbs):
        if value is None:
            txn.delete(key, db=dbs[b"info"])
        else:
            txn.put(key, value, db=dbs[b"info"])
    return edit


def lmdb_scenarios() -> list[Scenario]:
    edits = {
        "one letter of a row's text": _replace_in_row(3, b'"text":"', b'"text":"Q'),
        "one token id of a row": _replace_in_row(4, b'"token_ids":[', b'"token_ids":[1,'),
        "a row's bytes made non-UTF-8": _replace_in_row(5, b'"text":"', b'"text":"\xff\xfe'),
        "two rows swapped": _swap_rows(1, 2),
        "a row deleted": lambda txn, dbs: txn.delete(_row_key(6), db=dbs[b"rows"]),
        "committed count lowered": _set_info(b"committed", b"16"),
        "committed count raised": _set_info(b"committed", b"40"),
        "committed count not a number": _set_info(b"committed", b"x1"),
        "sealed mark removed": _set_info(b"sealed", None),
        "journal emptied": lambda txn, dbs: txn.drop(dbs[b"journal"], delete=False),
        "document index emptied": lambda txn, dbs: txn.drop(dbs[b"docs"], delete=False),
    }
    return [Scenario("lmdb edit", name, lmdb_edit(1, edit)) for name, edit in edits.items()]


def manifest_edit(edit: Callable[[dict], None], reseal: bool) -> Callable[[Pristine, Path], tuple[str, str]]:
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        from attribdb import manifest_schema

        db = copy_of(p, where)
        path = db / "manifest.json"
        data = json.loads(path.read_text())
        edit(data)
        if reseal:  # what a program that means the change would write
            data.pop(manifest_schema.CHECKSUM_KEY, None)
            data[manifest_schema.CHECKSUM_KEY] = manifest_schema.digest(data)
        path.write_text(json.dumps(data, indent=2))
        return judge_damaged(p, db)
    return scenario


def manifest_setter(*keys, value):
    """An edit of manifest data (a dict) that sets the item at the path ``keys`` to ``value``."""
    def edit(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


def manifest_scenarios() -> list[Scenario]:
    edits = {
        "row_bytes 4096 -> 2048": manifest_setter("settings", "row_bytes", value=2048),
        "a module's row subspace widened": lambda d: d["rows"]["subspaces"][d["modules"][0]["name"]].__setitem__(
            1, d["rows"]["subspaces"][d["modules"][0]["name"]][1] + 1),
        "shards -> 10**9": manifest_setter("generations", 0, "shards", value=10 ** 9),
        "shards one fewer": lambda d: d["generations"][0].update(shards=d["generations"][0]["shards"] - 1),
        "a settings key misspelled": lambda d: d["settings"].update(rwo_bytes=d["settings"].pop("row_bytes")),
        "an unknown key": manifest_setter("extra", value=1),
        "damping_factor a string": manifest_setter("settings", "damping_factor", value="0.1"),
        "state complete -> building": manifest_setter("generations", 0, "state", value="building"),
        "model fingerprint changed": manifest_setter("model", "fingerprint", value="0" * 64),
        "row format lowrank-int4 -> kron": manifest_setter("rows", "format", value="kron"),
        "row layout removed (null)": manifest_setter("rows", value=None),
        "emptied to {}": lambda d: d.clear(),
    }
    out = []
    for name, edit in edits.items():
        for reseal in (False, True):
            out.append(Scenario("manifest", f"{name} ({'resealed' if reseal else 'hand edit'})",
                                manifest_edit(edit, reseal)))
    return out


def remove_tree(rel: str) -> Callable[[Pristine, Path], tuple[str, str]]:
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        db = copy_of(p, where)
        shutil.rmtree(db / rel)
        return judge_damaged(p, db)
    return scenario


def kill_and_resume(point: str, count: int, twice: bool = False) -> Callable[[Pristine, Path], tuple[str, str]]:
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        db = where / "db"
        build = ("build", db, "--corpus", p.corpus, "--model", p.model, "--quiet", *SETTINGS)
        kills = [f"{point}:{count}"] * (2 if twice else 1)  # each run counts its own passes from 1
        for kill in kills:
            killed = cli(*build, env={"ATTRIBDB_KILL_AT": kill})
            if killed.get("signal") != signal.SIGKILL:
                return failed(killed) or OK, f"not killed at {kill} ({killed.get('exit')})"
            verify = cli("verify", db)
            if failed(verify) is not None:
                return UNCLEAR, f"verify after the kill: {verify.get('stderr', verify).strip()[:160]}"
        resumed = cli(*build)
        if failed(resumed) is not None:
            return failed(resumed), f"resume: {resumed.get('stderr', resumed)}"
        return judge_rebuilt(p, db)
    return scenario


def kill_scenarios(units: int, quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario("kill", "unit-committed:2", kill_and_resume("unit-committed", 2))]
    out = [Scenario("kill", f"{point}:1", kill_and_resume(point, 1)) for point in
           ("factors-saved", "generation-registered")]
    for n in sorted({1, 2, 3, units // 2, units - 1, units}):
        out += [Scenario("kill", f"unit-written:{n}", kill_and_resume("unit-written", n)),
                Scenario("kill", f"unit-committed:{n}", kill_and_resume("unit-committed", n))]
    shards = max(1, units // 4)
    for n in sorted({1, 2, shards // 2, shards}):
        out += [Scenario("kill", f"{point}:{n}", kill_and_resume(point, n)) for point in
                ("indexes-written", "shard-sealed")]
    out += [Scenario("kill", f"twice unit-committed:{n}", kill_and_resume("unit-committed", n, twice=True))
            for n in (2, units // 2)]
    return out


def concurrent_builds(delay: float, second: str) -> Callable[[Pristine, Path], tuple[str, str]]:
    """Two writers on one new database: one may be refused (one line), none may interleave rows."""
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        db = where / "db"
        build = ("build", db, "--corpus", p.corpus, "--model", p.model, "--quiet", *SETTINGS)
        first = start(cli_work(*build))
        time.sleep(delay)
        other = start(cli_work(*(build if second == "build" else ("append", db, "--corpus", p.extra, "--quiet"))))
        results = [first.finish(), other.finish()]
        for result in results:
            if failed(result) not in (None, CLEAR):
                return failed(result), str(result)[:200]
        refused = [r["stderr"].strip() for r in results if failed(r) == CLEAR]
        rerun = cli(*build)
        if failed(rerun) is not None:
            return failed(rerun), f"the re-run: {rerun.get('stderr')}"
        expected = None
        if second == "append" and failed(results[1]) is None:  # the build had finished: its rows, then the append's
            appended = copy_of(p, where / "expected")
            cli("append", appended, "--corpus", p.extra, "--quiet")
            expected = run(digest_work(appended))
        outcome = judge_rebuilt(p, db, expected)
        return outcome[0], f"{outcome[1]}; refused: {refused[0][:90] if refused else 'none'}"
    return scenario


def concurrent_appends(delay: float) -> Callable[[Pristine, Path], tuple[str, str]]:
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        db = copy_of(p, where)
        extra2 = where / "extra2.jsonl"
        extra2.write_text(p.extra.read_text().replace('"id": "x', '"id": "y'))
        first = start(cli_work("append", db, "--corpus", p.extra, "--quiet"))
        time.sleep(delay)
        second = start(cli_work("append", db, "--corpus", extra2, "--quiet"))
        results = [first.finish(), second.finish()]
        for result in results:
            if failed(result) not in (None, CLEAR):
                return failed(result), str(result)[:200]
        for corpus in (p.extra, extra2):  # finish whatever was refused: "already in" is fine
            again = cli("append", db, "--corpus", corpus, "--quiet")
            if failed(again) not in (None, CLEAR):
                return failed(again), str(again)[:200]
        verify = cli("verify", db)
        if failed(verify) is not None or verify["exit"] != 0:
            return failed(verify) or UNCLEAR, verify.get("stderr", "")[:200]
        extra_rows = run(digest_work(db))["rows"] - p.digest["rows"]
        single = cli("append", copy_of(p, where / "one"), "--corpus", p.extra, "--quiet")
        expected = 2 * int(re.search(r"(\d+) sequences", single["stdout"]).group(1))
        return (OK, f"{extra_rows} appended rows") if extra_rows == expected else \
            (LOST, f"{extra_rows} of {expected} appended rows")
    return scenario


def read_while_writing(delay: float) -> Callable[[Pristine, Path], tuple[str, str]]:
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        db = where / "db"
        writer = start(cli_work("build", db, "--corpus", p.corpus, "--model", p.model, "--quiet", *SETTINGS))
        time.sleep(delay)
        readers = [cli(*args) for args in (("verify", db), ("info", db, "--json"),
                                           ("query", db, "--queries", p.queries, "--format", "json"))]
        written = writer.finish()
        for result in [written] + readers:
            if failed(result) not in (None, CLEAR):
                return failed(result), str(result)[:200]
        return judge_rebuilt(p, db)
    return scenario


READER_STARTS = Counter()  # readers during appends: reader starts and failures, printed under the table


def append_work(db: Path, corpora: list[Path], grace: float | None) -> Callable[[], dict]:
    """Append ``corpora`` one after another in one child; with ``grace``, the database index files
    each append replaces are deleted that many seconds after they were retired (0: at once, the
    worst case for a reader that has just read the manifest naming one)."""
    def work() -> dict:
        from attribdb import db_index

        if grace is not None:
            db_index.GRACE_SECONDS = grace
        results = [cli_work("append", db, "--corpus", corpus, "--quiet")() for corpus in corpora]
        return next((r for r in results if r["exit"] != 0 or r["traceback"]), results[-1])
    return work


def readers_during_appends(appends: int, docs: int, loops: int, grace: float | None
                           ) -> Callable[[Pristine, Path], tuple[str, str]]:
    """``loops`` readers run `attribdb query` one after another while ``appends`` appends land on a
    database with a database index (pq4): every reader started while the appends ran must answer,
    whatever the writer was doing (recording a new index, retiring, deleting the old one)."""
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        db = where / "db"
        built = cli("build", db, "--corpus", p.corpus, "--model", p.model, "--quiet", *SETTINGS, "--index-kind", "pq4")
        if failed(built) is not None:
            return failed(built), f"the build: {built.get('stderr')}"
        rng = random.Random(appends)
        sentences = english_sentences()
        corpora = []
        for a in range(appends):
            corpora.append(where / f"append{a}.jsonl")
            corpora[-1].write_text("".join(json.dumps({"id": f"a{a}-{i}", "text": " ".join(
                rng.choice(sentences) for _ in range(rng.randint(1, 3)))}) + "\n" for i in range(docs)))
        writer = start(append_work(db, corpora, grace))
        query = ("query", db, "--queries", p.queries, "--format", "json", "-k", "5", "--rescore", "0")
        running, results = [start(cli_work(*query)) for _ in range(loops)], []
        while running:
            results.append(running.pop(0).finish())
            if writer.running():
                running.append(start(cli_work(*query)))
        written = writer.finish()
        if failed(written) is not None:
            return failed(written), f"the appends: {str(written)[:200]}"
        bad = [r for r in results if failed(r) is not None or not answers(r)]
        READER_STARTS.update(starts=len(results), failed=len(bad))
        verify = cli("verify", db)
        if failed(verify) is not None or verify["exit"] != 0:
            return failed(verify) or UNCLEAR, f"verify after the appends: {verify.get('stderr', '')[:160]}"
        if bad:
            first = bad[0].get("stderr") or bad[0].get("traceback") or str(bad[0])
            return failed(bad[0]) or WRONG, f"{len(bad)} of {len(results)} readers failed: {first.strip()[:150]}"
        return OK, f"{len(results)} reader starts during {appends} appends, none failed"
    return scenario


def concurrency_scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario("concurrency", "two builds at once", concurrent_builds(0.0, "build")),
                Scenario("readers", "query loops during 2 appends, replaced indexes deleted at once",
                         readers_during_appends(2, 8, 2, grace=0.0))]
    out = [Scenario("concurrency", f"two builds {d}s apart", concurrent_builds(d, "build"))
           for d in (0.0, 0.05, 0.2, 0.5, 1.0)]
    out += [Scenario("concurrency", f"build and append {d}s apart", concurrent_builds(d, "append"))
            for d in (0.2, 1.0, 5.0)]
    out += [Scenario("concurrency", f"two appends {d}s apart", concurrent_appends(d)) for d in (0.0, 1.0)]
    out += [Scenario("concurrency", f"verify, info, query {d}s into a build", read_while_writing(d))
            for d in (0.3, 1.0)]
    out += [Scenario("readers", f"3 query loops during 5 appends, {label}", readers_during_appends(5, 40, 3, grace))
            for grace, label in ((None, "replaced indexes kept for the grace period"),
                                 (0.0, "replaced indexes deleted at once"))]
    return out


def refused(*args, api: Callable | None = None, fresh: bool = True) -> Callable[[Pristine, Path], tuple[str, str]]:
    """A bad option or input: one clear line expected; an answer is a silently accepted mistake."""
    def scenario(p: Pristine, where: Path) -> tuple[str, str]:
        db = where / "db" if fresh else copy_of(p, where)
        values = {"db": db, "corpus": p.corpus, "model": p.model, "extra": p.extra, "where": where}
        if api is not None:
            result = run(lambda: api(values))
        else:
            result = cli(*[str(a).format(**values) for a in args])
        cls = failed(result)
        if cls is None:
            return WRONG, f"accepted: {(result.get('stdout') or str(result))[:150]}"
        detail = result.get("stderr", "").strip() or result.get("traceback") or str(result)
        if fresh and cls == CLEAR and (db / "manifest.json").exists():
            return UNCLEAR, f"refused but left a manifest behind: {detail[:120]}"
        return cls, detail[:160]
    return scenario


def api_call(call: Callable) -> Callable[[dict], dict]:
    def work(values: dict) -> dict:
        from attribdb import api
        from attribdb.errors import AttribdbError

        try:
            with api.open(values["db"]) as database:
                out = call(database)
            return {"exit": 0, "stdout": str(out)[:100], "stderr": "", "traceback": None}
        except AttribdbError as exc:
            return {"exit": 1, "stdout": "", "stderr": f"Error: {exc}", "traceback": None}
        except Exception as exc:  # noqa: BLE001 - what a user of the API would see
            return {"exit": 1, "stdout": "", "stderr": "", "traceback": f"{type(exc).__name__}: {exc}"}
    return work


def input_files(where: Path) -> dict[str, Path]:
    files = {"empty.jsonl": b"", "binary.jsonl": bytes(range(256)) * 4,
             "latin1.jsonl": b'{"id": "a", "text": "caf\xe9"}\n', "notjson.jsonl": b"{not json\n",
             "notext.jsonl": b'{"id": "a", "body": "x"}\n',
             "dupids.jsonl": b'{"id": "a", "text": "one two three"}\n{"id": "a", "text": "four five six"}\n',
             "q-latin1.jsonl": b'{"prompt": "caf\xe9", "completion": " x"}\n', "q-bad.jsonl": b"[1, 2]\n",
             "q-empty.jsonl": b'{"prompt": "a", "completion": ""}\n'}
    for name, data in files.items():
        (where / name).write_bytes(data)
    return {name: where / name for name in files}


def option_scenarios(quick: bool) -> list[Scenario]:
    new = ("build", "{db}", "--corpus", "{corpus}", "--model", "{model}", "--quiet", *SETTINGS)
    bad_options = [("--damping", "inf"), ("--damping", "nan"), ("--damping", "-1"), ("--damping-factor", "nan"),
                   ("--damping-factor", "inf"), ("--max-length", "65"), ("--max-length", "0"), ("--row-bytes", "0"),
                   ("--row-bytes", "-2"), ("--shard-size", "20"), ("--stride", "40"), ("--strategy", "magic"),
                   ("--fisher", "maybe"), ("--commit-rows", "0"), ("--batch-size", "0"),
                   ("--index-kind", "tree"), ("--dtype", "int8")]
    if quick:
        bad_options = bad_options[:1]
    out = [Scenario("options", f"build {o} {v}", refused(*new, o, v)) for o, v in bad_options]
    if quick:
        return out
    files = ["empty.jsonl", "binary.jsonl", "notjson.jsonl", "notext.jsonl", "dupids.jsonl"]
    out += [Scenario("inputs", f"build on {name}", refused("build", "{db}", "--corpus", "{where}/" + name,
                                                            "--model", "{model}", "--quiet", *SETTINGS))
            for name in files]
    out += [
        Scenario("inputs", "model folder without tokenizer", refused(
            "build", "{db}", "--corpus", "{corpus}", "--model", "{where}/bare-model", "--quiet", *SETTINGS)),
        Scenario("inputs", "model folder that is not a model", refused(
            "build", "{db}", "--corpus", "{corpus}", "--model", "{where}", "--quiet", *SETTINGS)),
        Scenario("inputs", "append to no database", refused("append", "{db}", "--corpus", "{extra}", "--quiet")),
        Scenario("inputs", "verify no database", refused("verify", "{db}")),
        Scenario("inputs", "query no database", refused("query", "{db}", "--prompt", "a", "--completion", " b")),
        Scenario("inputs", "append the built corpus again", refused("append", "{db}", "--corpus", "{corpus}",
                                                                    "--quiet", fresh=False)),
        Scenario("inputs", "build another corpus into it", refused("build", "{db}", "--corpus", "{extra}",
                                                                   "--quiet", fresh=False)),
        Scenario("inputs", "rebuild with another row size", refused("build", "{db}", "--corpus", "{corpus}",
                                                                    "--row-bytes", "2048", "--quiet", fresh=False)),
        Scenario("inputs", "fit again without --refit", refused("fit", "{db}", "--corpus", "{corpus}", "--model",
                                                                "{model}", "--quiet", fresh=False)),
        Scenario("inputs", "non-UTF-8 query file", refused("query", "{db}", "--queries", "{where}/q-latin1.jsonl",
                                                           fresh=False)),
        Scenario("inputs", "query file of a list", refused("query", "{db}", "--queries", "{where}/q-bad.jsonl",
                                                           fresh=False)),
        Scenario("inputs", "empty completion", refused("query", "{db}", "--queries", "{where}/q-empty.jsonl",
                                                       fresh=False)),
        Scenario("inputs", "-k 0", refused("query", "{db}", "--prompt", "a", "--completion", " b", "-k", "0",
                                           fresh=False)),
        Scenario("api", "exhaustive(k=-1)", refused(api=api_call(lambda d: d.exhaustive([("a", " b")], k=-1)),
                                                    fresh=False)),
        Scenario("api", "query(k=0)", refused(api=api_call(lambda d: d.query("a", " b", k=0)), fresh=False)),
        Scenario("api", "query(candidates=-5)", refused(api=api_call(lambda d: d.query("a", " b", candidates=-5)),
                                                        fresh=False)),
        Scenario("api", "self_influence(top=0)", refused(api=api_call(lambda d: d.self_influence(top=0)),
                                                         fresh=False)),
    ]
    return out


# ---- the run -----------------------------------------------------------------

def prepare(workdir: Path, quick: bool) -> Pristine:
    rng = random.Random(0)
    sentences = english_sentences()
    docs = 12 if quick else 30

    def corpus(path: Path, n: int, prefix: str) -> Path:
        with open(path, "w") as handle:
            for i in range(n):
                text = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 3)))
                handle.write(json.dumps({"id": f"{prefix}{i}", "text": text}) + "\n")
        return path

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": corpus(workdir / "corpus.jsonl", docs, "d"), "extra": corpus(workdir / "extra.jsonl", 4, "x")}
    model = workdir / "model"
    if not (model / "config.json").exists():
        made = run(lambda: {"model": str(make_model(model, sentences[:2000], layers=2, width=32, vocab=400,
                                                    positions=64))})
        assert "model" in made, made
    # built afresh every run: a pristine database kept from a --quick run (another corpus) or from
    # older code would make every rebuilt scenario look "silently wrong"
    db = workdir / "pristine"
    shutil.rmtree(db, ignore_errors=True)
    built = cli("build", db, "--corpus", paths["corpus"], "--model", model, "--quiet", *SETTINGS)
    assert built["exit"] == 0, built
    queries = workdir / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    reference = cli("query", db, "--queries", queries, "--format", "json", "-k", "5")
    assert reference["exit"] == 0, reference
    return Pristine(db, paths["corpus"], paths["extra"], model, queries, answers(reference), run(digest_work(db)))


def scenarios(p: Pristine, quick: bool) -> list[Scenario]:
    rng = random.Random(1)
    units = p.digest["rows"] // 8
    if quick:
        lmdb = [s for s in lmdb_scenarios() if s.name in ("one letter of a row's text", "two rows swapped")]
        damaged = [Scenario("damage", "truncate@0.90 shards/00001/meta.lmdb/data.mdb",
                            damage("shards/00001/meta.lmdb/data.mdb", "truncate", 0.9)),
                   Scenario("damage", "delete shards/00002", remove_tree("shards/00002"))]
        return damaged + lmdb + kill_scenarios(units, True) + concurrency_scenarios(True) + option_scenarios(True)
    removals = [Scenario("damage", f"delete {rel}", remove_tree(rel)) for rel in
                ("shards/00002", "shards/00001/grads.zarr", "shards/00001/meta.lmdb", "shards/00001/grads.zarr/rows",
                 "factors")]
    return (damage_scenarios(p, rng, per_kind=2) + removals + lmdb_scenarios() + manifest_scenarios()
            + kill_scenarios(units, False) + concurrency_scenarios(False) + option_scenarios(False))


def warm_imports() -> None:
    """Import once here what every child needs, so forking makes each command cheap."""
    import faiss  # noqa: F401
    import lmdb  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import zarr  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel  # noqa: F401

    import attribdb.cli  # noqa: F401
    import attribdb.indexer.build  # noqa: F401
    import attribdb.query.engine  # noqa: F401
    import attribdb.runtime  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "attribdb-torture")
    parser.add_argument("--quick", action="store_true", help="a handful of scenarios, one per group (for CI)")
    parser.add_argument("--only", default=None, help="run only scenarios whose group or name contains this")
    args = parser.parse_args()
    warm_imports()
    pristine = prepare(args.workdir, args.quick)
    report = Report()
    for scenario in scenarios(pristine, args.quick):
        if args.only and args.only not in f"{scenario.group} {scenario.name}":
            continue
        where = Path(tempfile.mkdtemp(prefix="scenario-", dir=args.workdir))
        input_files(where)
        bare = where / "bare-model"
        shutil.copytree(pristine.model, bare, ignore=shutil.ignore_patterns("*token*", "vocab.json", "merges.txt"))
        began = time.time()
        try:
            outcome, detail = scenario.run(pristine, where)
        except Exception as exc:  # noqa: BLE001 - a harness failure is reported, not fatal to the run
            outcome, detail = UNCLEAR, f"harness: {type(exc).__name__}: {exc}"
        report.add(scenario, outcome, detail, time.time() - began)
        shutil.rmtree(where, ignore_errors=True)
    print()
    print(report.table())
    if READER_STARTS:
        print(f"readers during appends: {READER_STARTS['starts']} reader starts, {READER_STARTS['failed']} failed")


if __name__ == "__main__":
    main()
