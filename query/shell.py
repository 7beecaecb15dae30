"""`attribdb shell`: keep the model and indexes loaded, answer query after query.

Input lines:  ``prompt || completion`` asks a query; ``:k N``, ``:mode
index|exact``, ``:format table|json`` change settings; ``:help``; ``:quit``.
History is kept with readline (in ``~/.attribdb_history``) when stdin is a
terminal; piped input works line by line, so scripts can drive it too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from attribdb.errors import AttribdbError
from attribdb.query.formats import render

HELP = """enter:  PROMPT || COMPLETION     e.g.  The capital of Vorlandia is || Quessel
        :k N   :mode index|exact   :format table|json   :help   :quit"""
HISTORY = Path.home() / ".attribdb_history"


@dataclass
class ShellState:
    k: int = 10
    mode: str = "index"
    fmt: str = "table"


def _setup_history() -> None:
    try:
        import atexit
        import readline
    except ImportError:  # pragma: no cover - readline is missing on some platforms
        return
    if HISTORY.exists():
        readline.read_history_file(HISTORY)
    atexit.register(readline.write_history_file, HISTORY)


def _command(line: str, state: ShellState) -> str:
    name, _, value = line[1:].partition(" ")
    value = value.strip()
    if name == "k" and value.isdigit() and int(value) > 0:
        state.k = int(value)
    elif name == "mode" and value in ("index", "exact"):
        state.mode = value
    elif name == "format" and value in ("table", "json"):
        state.fmt = value
    elif name == "help":
        return HELP
    else:
        return f"unknown command {line!r}\n{HELP}"
    return f"k={state.k} mode={state.mode} format={state.fmt}"


def run_shell(db, stdin=sys.stdin, stdout=sys.stdout) -> int:
    """The read-eval-print loop; returns the exit code."""
    interactive = stdin.isatty()
    if interactive:
        _setup_history()
    rows = db.info()["sequences"]
    print(f"attribdb shell: {db.path} ({rows} sequences). {HELP}", file=stdout)
    _ = db.engine  # load the model and indexes before the first prompt
    state = ShellState()
    while True:
        if interactive:
            try:
                line = input("attribdb> ")
            except EOFError:
                break
        else:
            line = stdin.readline()
            if not line:
                break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in (":quit", ":q", "exit", "quit"):
            break
        if line.startswith(":"):
            print(_command(line.strip(), state), file=stdout)
            continue
        prompt, sep, completion = line.partition("||")
        if not sep:
            print("error: separate prompt and completion with ||", file=stdout)
            continue
        try:
            # "prompt || text": the completion keeps its one leading space, as a continuation would
            ask = db.exact if state.mode == "exact" else db.query
            answer = ask(prompt.rstrip(), completion.rstrip(), k=state.k)
            print(render([answer], state.fmt), file=stdout)
        except AttribdbError as exc:
            print(f"error: {exc}", file=stdout)
        stdout.flush()
    return 0
