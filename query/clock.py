"""Where a query's time goes: laps in milliseconds, as results report them in ``timings_ms``."""

from __future__ import annotations

import time


class Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Charge the time since the last lap to ``name`` (added up when a name comes again)."""
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + 1000 * (now - self.last)
        self.last = now

    def total(self) -> dict[str, float]:
        return self.laps | {"total": 1000 * (time.perf_counter() - self.start)}

    def per_query(self, queries: int) -> dict[str, float]:
        """The laps and total shared out over the ``queries`` answered together."""
        return {name: value / queries for name, value in self.total().items()}
