"""Installation: FAISS comes from one extra, and its absence is one clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_missing_faiss_is_one_clear_error_naming_the_extras():
    code = ("import sys; sys.modules['faiss'] = None\n"
            "from attribdb.errors import ConfigError\n"
            "try:\n    import attribdb.native\nexcept ConfigError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert "FAISS is not installed" in result.stdout and "attribdb[cpu]" in result.stdout


@pytest.mark.slow
def test_the_wheel_installs_one_namespace(tmp_path):
    """indexer/ and query/ sit at the top of the repository but install inside attribdb, so a
    user's own query.py or indexer/ cannot shadow them."""
    import shutil
    import zipfile
    from pathlib import Path

    # from a copy: setuptools builds in the source's build/, whose leftovers would reach the wheel
    source = tmp_path / "source"
    shutil.copytree(Path(__file__).resolve().parents[1], source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", ".ci-venv", ".venv", "__pycache__", "attribdb-demo"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    [wheel] = (tmp_path / "wheel").glob("attribdb-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"attribdb"}
    site = tmp_path / "site"
    assert (site / "attribdb" / "query" / "engine.py").is_file()
    assert (site / "attribdb" / "indexer" / "build.py").is_file()
    probe = ("import importlib.util, attribdb.query.engine, attribdb.indexer.build\n"
             "print(attribdb.query.engine.__file__)\n"
             "print([importlib.util.find_spec(name) for name in ('query', 'indexer')])\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                            env=os.environ | {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    engine_file, specs = result.stdout.splitlines()
    assert engine_file.startswith(str(site)) and specs == "[None, None]"
