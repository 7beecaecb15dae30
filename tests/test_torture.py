"""The reduced fault-injection run (tools/checks/torture.py --quick): no traceback, crash, wrong answer or lost row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.torture]
REPOSITORY = Path(__file__).resolve().parents[1]


def test_quick_torture_run_has_no_bad_outcome(tmp_path):
    command = [sys.executable, "-m", "tools.checks.torture", "--quick", "--workdir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
                            env=os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    totals = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[-1].isdigit():
            totals[cells[0]] = int(cells[-1])
    assert totals["**scenarios**"] >= 7, result.stdout
    for bad in ("traceback or unclear error", "crash without message", "silently wrong result", "rows lost"):
        assert totals[bad] == 0, f"{bad}:\n{result.stdout}"
    assert totals["clear error"] >= 5, "the damage, edit and option scenarios must be refused"
    assert totals["survived cleanly"] >= 2, "the kill and the concurrent writers must end in the pristine rows"
