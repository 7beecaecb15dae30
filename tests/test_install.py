"""Installation: FAISS comes from one extra, and its absence is one clear error."""

from __future__ import annotations

import os
import subprocess
import sys


def test_missing_faiss_is_one_clear_error_naming_the_extras():
    code = ("import sys; sys.modules['faiss'] = None\n"
            "from attribdb.errors import ConfigError\n"
            "try:\n    import attribdb.native\nexcept ConfigError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert "FAISS is not installed" in result.stdout and "attribdb[cpu]" in result.stdout
