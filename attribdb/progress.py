"""Progress bars on stderr (stdout stays clean for JSON), silenced by --quiet."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(description: str, total: int | None, quiet: bool, unit: str = "seq"):
    """Yield a callable ``advance(n)``; the bar shows rate and ETA when ``total`` is known."""
    bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, disable=quiet,
               dynamic_ncols=True, smoothing=0.1)
    try:
        yield bar.update
    finally:
        bar.close()


def say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)
