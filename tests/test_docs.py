"""The documentation says what the code does: every command and option is in the reference, every
command line of the README parses, the README stays short and free of the project's own jargon,
and nothing a user reads (help texts, docstrings) points at developer scripts.

Fast: it reads text and click's command tree; no model is loaded and no command is run."""

from __future__ import annotations

import ast
import inspect
import re
import shlex
from pathlib import Path

import click
import pytest

from attribdb.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference.md"
PRODUCT = ("attribdb", "indexer", "query")
README_MAX_LINES = 250

# Words that mean something only inside the project: issue and pull-request numbers, engineers' and
# branches' names, the planning vocabulary of its notes.
JARGON = [
    r"\bissues? ?#?\d+",
    r"(?<![\w&])#\d+\b",
    r"\bhelper[-_ ]?\d+",
    r"\bthis stop\b",
    r"\bgoals?\b",
    r"\bbranch(es)?\b",
    r"\b(eval3|scale3|ckpt)\b",
    r"\btools[/.]",
]
# What a help text or docstring must not point a user at: scripts a pip install does not have.
DEVELOPER_ONLY = [r"\btools[/.]\w", r"\bissues? ?#?\d+", r"\bhelper[-_ ]?\d+", r"\bthis stop\b"]


def commands(group: click.Group = main, prefix: str = "attribdb"):
    """(full name, command) of every command under ``group``, the group itself first."""
    yield prefix, group
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def option_names(command: click.Command) -> list[str]:
    """Every spelling of every option of ``command`` (``-k`` and ``--top``), --help included."""
    names = []
    for param in command.get_params(click.Context(command)):
        if isinstance(param, click.Option):
            names += [*param.opts, *param.secondary_opts]
    return names


def sections(text: str) -> dict[str, str]:
    """Markdown heading (lower case) -> the text under it, to the next heading of any level."""
    out, heading, fenced = {}, "", False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"#+ (.*)", line)
        if match:
            heading = match.group(1).strip().lower()
            out[heading] = ""
        else:
            out[heading] = out.get(heading, "") + line + "\n"
    return out


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def documented(section: str, by_anchor: dict[str, str]) -> str:
    """A command's section with the sections it links to on the same page (shared options)."""
    linked = re.findall(r"\]\(#([\w-]+)\)", section)
    return section + "".join(by_anchor.get(name, "") for name in linked)


def named(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_and_option_is_in_the_reference():
    reference = sections(REFERENCE.read_text())
    by_anchor = {anchor(heading): body for heading, body in reference.items()}
    missing = []
    for name, command in commands():
        heading = name if name != "attribdb" else "command line"  # the group's own options head the page
        if heading not in reference:
            missing.append(f"a section '### {name}'")
            continue
        text = documented(reference[heading], by_anchor)
        missing += [f"{option} under '{name}'" for option in option_names(command)
                    if option != "--help" and not named(option, text)]
    assert not missing, "docs/reference.md does not document: " + "; ".join(missing)


def test_every_python_call_is_in_the_reference():
    from attribdb import api

    reference = REFERENCE.read_text()
    functions = [name for name, member in inspect.getmembers(api, inspect.isfunction)
                 if not name.startswith("_") and member.__module__ == api.__name__]
    missing = [f"attribdb.{name}(" for name in functions
               if f"attribdb.{name}(" not in reference and f"attribdb.api.{name}(" not in reference]
    missing += [f"db.{name}(" for name, member in inspect.getmembers(api.Database, inspect.isfunction)
                if not name.startswith("_") and f"db.{name}(" not in reference]
    assert not missing, f"docs/reference.md does not document {missing}"


def readme_command_lines() -> list[str]:
    """Every `attribdb ...` line of the README's code blocks, and every inline `attribdb ...` span."""
    text = README.read_text()
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # and after && or ; on a line
            lines += [part.strip() for part in re.split(r"&&|;", line) if part.strip().startswith("attribdb ")]
    return lines + [span for span in prose_spans(text) if span.startswith("attribdb ")]


def prose_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


# `attribdb build` in a sentence or a table names the command; it is not a command line to run
PROSE_NAMES = {span for span in prose_spans(README.read_text()) if re.fullmatch(r"attribdb [a-z]+", span)}


def test_the_readme_has_command_lines():
    verbs = {line.split()[1] for line in readme_command_lines()}
    assert {"demo", "build", "query"} <= verbs


@pytest.mark.parametrize("line", readme_command_lines())
def test_readme_command_line_parses(line, monkeypatch):
    """Parsed and converted as the shell would pass it, options checked by click (names, values,
    choices, required ones), callbacks included; only whether a path exists is not asked.  A bare
    `attribdb COMMAND` in prose names a command and is only checked to exist."""
    monkeypatch.setattr(click.Path, "convert", lambda self, value, param, ctx: value)
    words = shlex.split(line, comments=True)[1:]
    group_args = []
    while words and words[0].startswith("-"):
        group_args.append(words.pop(0))
    assert words, f"{line!r} names no command"
    command = main.get_command(click.Context(main), words[0])
    assert command is not None, f"{line!r}: no command {words[0]!r}"
    if len(words) == 1 and not group_args and line.strip() == f"attribdb {words[0]}" and line in PROSE_NAMES:
        return
    try:
        main.make_context("attribdb", [*group_args, words[0]])
        command.make_context(f"attribdb {words[0]}", words[1:])
    except click.exceptions.Exit:  # --help or --version: parsed, and would print
        pass
    except click.ClickException as exc:
        pytest.fail(f"{line!r} does not parse: {exc.format_message()}")


def test_options_the_documents_name_exist():
    """An option renamed or removed in the code cannot live on in the README, the reference or the
    design (the evidence names the options of developer scripts too, and is left out)."""
    known = {option for _, command in commands() for option in option_names(command)}
    stale = []
    for page in (README, REFERENCE, DOCS / "design.md"):
        spans = prose_spans(page.read_text())
        stale += [f"{page.name}: {span}" for span in spans
                  if span.startswith("--") and re.match(r"--[\w-]+", span).group(0) not in known]
    assert not stale, f"options that no command has: {stale}"


def test_readme_is_short_and_speaks_to_users():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
    found = [(pattern, match.group(0)) for pattern in JARGON for match in re.finditer(pattern, text, flags=re.I)]
    assert not found, f"README.md uses the project's own vocabulary: {found}"


def test_readme_keeps_the_two_setup_commands():
    """.ci/run runs the test command; the demo command is a new user's first step."""
    text = README.read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[cpu]" && attribdb demo' in text
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q' in text


def test_links_between_documents_resolve():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, fragment = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name} -> {target}")
            elif fragment and path.suffix == ".md" and fragment not in {
                    anchor(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)}:
                broken.append(f"{page.name} -> {target}")
    assert not broken, f"links to nothing: {broken}"


def test_help_texts_point_at_docs_not_developer_scripts():
    texts = []
    for name, command in commands():
        texts.append((name, command.help or ""))
        texts += [(f"{name} {param.name}", param.help or "")
                  for param in command.params if isinstance(param, click.Option)]
    found = [(where, m.group(0)) for where, text in texts for pattern in DEVELOPER_ONLY
             if (m := re.search(pattern, text, flags=re.I))]
    assert not found, f"help texts cite what a user does not have: {found}"
    for target in re.findall(r"\bdocs/[\w.]+", " ".join(text for _, text in texts)):
        assert (ROOT / target).is_file(), f"a help text points at {target}, which does not exist"


def test_docstrings_of_the_package_point_at_docs_not_developer_scripts():
    """What help() shows: module, class and function docstrings (comments may cite scripts)."""
    found = []
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            nodes = [tree, *(n for n in ast.walk(tree)
                             if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
            for node in nodes:
                doc = ast.get_docstring(node) or ""
                found += [f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)} {m.group(0)!r}"
                          for pattern in DEVELOPER_ONLY if (m := re.search(pattern, doc, flags=re.I))]
    assert not found, f"docstrings cite what a user does not have: {found}"
