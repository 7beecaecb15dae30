"""Plain English paragraphs from the Debian man pages installed under /usr/share/man.

Real text that nobody on this project wrote, present offline on every machine of this kind, and
varied (thousands of programs, each page its own topic), so a model trained on it and queried on
held-out paragraphs of the same pages is a fair test of attribution.  The pages are troff source,
gzipped; they are read here in Python (no ``man``/``groff`` binary): the ``man`` macro package's
requests are turned into paragraph breaks or dropped, font and character escapes into plain text.
Pages in the BSD ``mdoc`` dialect, ``.so`` redirections and symlinks are skipped, so each page is
read once.  Tables (``.TS``/``.TE``), macro definitions and conditional blocks are dropped whole:
what remains is the pages' prose, option descriptions included.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
SECTIONS = tuple(f"man{n}" for n in range(1, 9))  # the English pages; translations live in <lang>/manN

# requests that end a paragraph (their arguments, if any, are not prose)
BREAKS = {"SH", "SS", "PP", "P", "LP", "TP", "TQ", "IP", "HP", "sp", "br", "RS", "RE", "nf", "fi", "EX", "EE",
          "in", "ti", "bp", "ne", "UE", "ME", "YS", "SY", "OP"}
# font macros whose arguments are prose: alternating ones join their arguments without spaces
FONTS = {"B", "I", "SM", "SB"}
ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
# blocks dropped whole: (opening request, closing request)
BLOCKS = {"TS": "TE", "de": "..", "de1": "..", "am": "..", "ig": "..", "EQ": "EN", "PS": "PE"}

NAMED = {"em": "—", "en": "–", "hy": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'",
         "bu": "•", "co": "©", "rg": "®", "tm": "™", "de": "°", "mu": "×", "di": "÷", "pl": "+", "mi": "-",
         "eq": "=", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "ti": "~", "ha": "^", "rs": "\\",
         "ga": "`", "aa": "´", "sl": "/", "ba": "|", "or": "|", "lh": "☜", "rh": "☞", "fm": "′", "sq": "□",
         "R": "®", "Tm": "™"}
ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\(..|.)"  # font
    r"|s[-+]?(?:\d|\(\d\d|\[\d+\])"  # size
    r"|\*(?:\[(?P<string_long>[^\]]*)\]|\((?P<string2>..)|(?P<string1>.))"  # defined strings
    r"|\((?P<char2>..)|\[(?P<char_long>[^\]]*)\]"  # named characters
    r"|[nk](?:\[[^\]]*\]|\(..|.)|[hvwoNDlLxXbRSZ]'[^']*'|[gmMYV](?:\[[^\]]*\]|\(..|.)"  # motions, registers
    r"|(?P<plain>.)"
    r")")
PLAIN = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ", "&": "", "|": "", "^": "", "c": "",
         "%": "", ":": "", "/": "", ",": "", ")": "", "'": "´", "`": "`", ".": ".", "!": "", "p": "", "{": "", "}": "",
         "z": "", "a": "", "E": "", "r": "", "u": "", "d": ""}


@dataclass(frozen=True)
class ManPage:
    path: Path  # the .gz file under /usr/share/man
    name: str  # e.g. "tar.1"
    paragraphs: tuple[str, ...]


def unescape(line: str) -> str:
    """A line's troff escapes as the characters they stand for (fonts and motions dropped)."""
    def replace(match: re.Match) -> str:
        named = match.group("char2") or match.group("char_long")
        if named is not None:
            return NAMED.get(named, "")
        string = match.group("string2") or match.group("string_long") or match.group("string1")
        if string is not None:
            return NAMED.get(string, "")
        plain = match.group("plain")
        return PLAIN.get(plain, plain) if plain is not None else ""

    return ESCAPE.sub(replace, line)


def _request(line: str) -> tuple[str, str]:
    """(request name, its argument text) of a control line ``.XX args``."""
    body = line[1:].lstrip()
    name, _, rest = body.partition(" ")
    return name, rest.strip()


def _arguments(text: str) -> list[str]:
    """A macro's arguments: words, or "double-quoted phrases"."""
    return [a[1:-1] if a.startswith('"') and a.endswith('"') and len(a) > 1 else a
            for a in re.findall(r'"[^"]*"|\S+', text)]


def troff_paragraphs(source: str) -> list[str] | None:
    """The prose paragraphs of a ``man``-macro page, whitespace collapsed; None for a page this
    reader does not take (an ``mdoc`` page or a ``.so`` redirection)."""
    paragraphs: list[str] = []
    current: list[str] = []
    closing: str | None = None  # inside a dropped block until this request
    depth = 0  # inside a conditional \{ ... \} block

    def flush() -> None:
        text = " ".join(" ".join(current).split())
        if text:
            paragraphs.append(text)
        current.clear()

    for raw in source.replace("\\\n", "").splitlines():
        if closing is not None:
            if raw.startswith(".") and _request(raw)[0] == closing.lstrip("."):
                closing = None
            elif closing == ".." and raw.strip() == "..":
                closing = None
            continue
        if depth:
            depth += raw.count("\\{") - raw.count("\\}")
            continue
        if raw.startswith((".\\\"", "'\\\"", '.\\"', "\\\"", ".\\#")) or raw.strip() in (".", "'"):
            continue
        if raw.startswith((".", "'")):
            name, rest = _request(raw)
            if name in ("Dd", "Sh", "Nm") or name == "so":
                return None
            if name in BLOCKS:
                closing = BLOCKS[name]
                continue
            if name in ("if", "ie", "el", "while"):
                depth = max(0, raw.count("\\{") - raw.count("\\}"))
                continue
            if name in BREAKS:
                flush()
                if name == "IP" and rest:  # an item's tag (.TP's tag is the next line, its argument an indent)
                    current.append(unescape(_arguments(rest)[0]))
                continue
            if name in FONTS:
                current.append(unescape(" ".join(_arguments(rest))))
            elif name in ALTERNATING:
                current.append(unescape("".join(_arguments(rest))))
            elif name in ("UR", "MT"):
                current.append(unescape(rest))
            continue  # any other request (.TH, .ds, .nr, .ft, .ad, .hy, ...) is not prose
        current.append(unescape(raw))
    flush()
    return paragraphs


def is_prose(paragraph: str, min_words: int = 8) -> bool:
    """Mostly words, not a synopsis, a table row or a block of code."""
    words = paragraph.split()
    if len(words) < min_words or not paragraph.isascii():
        return False
    alphabetic = sum(1 for w in words if w.strip(".,;:()\"'").isalpha())
    return alphabetic >= 0.7 * len(words)


def read_page(path: Path) -> ManPage | None:
    try:
        source = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    paragraphs = troff_paragraphs(source)
    if paragraphs is None:
        return None
    return ManPage(path, path.name.removesuffix(".gz"), tuple(p for p in paragraphs if is_prose(p)))


def page_files(root: Path = MAN_ROOT) -> list[Path]:
    """Every English man page file, sorted (the order the corpus draws from), symlinks left out."""
    return sorted(p for section in SECTIONS for p in (root / section).glob("*.gz") if not p.is_symlink())


def packages_of(paths: list[Path], info: Path = Path("/var/lib/dpkg/info")) -> dict[str, str]:
    """The Debian package each file came from (dpkg's file lists), where dpkg knows it."""
    wanted = {str(p) for p in paths}
    owners: dict[str, str] = {}
    for listing in sorted(info.glob("*.list")):
        package = listing.name.removesuffix(".list")
        for line in listing.read_text(errors="replace").splitlines():
            if line in wanted:
                owners[line] = package
    return owners
