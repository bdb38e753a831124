"""What a PyPI user gets: the version, the metadata, and an sdist whose tests run.

The sdist is built as a packager would (``python -m build --sdist``), unpacked, and its test
suite collected against its own ``src/``: every test module of the checkout is there, with
what it needs (conftest, helpers, apps, README harnesses), and nothing fails to import.
"""

from __future__ import annotations

import email
import re
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

import pytest

import flask_offload
from conftest import HERE, subprocess_env

ROOT = HERE.parent


def test_the_version_is_the_distributions() -> None:
    assert flask_offload.__version__ == version("Flask-Offload")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpacked sdist of this checkout."""
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [archive] = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    [unpacked] = [path for path in out.iterdir() if path.is_dir()]
    return unpacked


@pytest.mark.slow
def test_the_metadata_says_what_a_pypi_user_needs(sdist: Path) -> None:
    meta = email.message_from_string((sdist / "PKG-INFO").read_text())
    assert meta["Version"] == flask_offload.__version__
    assert meta["License-Expression"] == "MIT" and meta["Requires-Python"] == ">=3.10"
    assert meta["Author"] and meta["Description-Content-Type"] == "text/markdown"
    classifiers = meta.get_all("Classifier") or []
    assert any(c.startswith("Development Status ::") for c in classifiers)
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    extras = set(meta.get_all("Provides-Extra") or [])
    assert extras == {"cron", "postgres", "metrics", "otel", "test", "docs", "dev"}, (
        "no bench extra"
    )
    test_needs = [r for r in meta.get_all("Requires-Dist") or [] if 'extra == "test"' in r]
    assert not [r for r in test_needs if r.startswith(("ruff", "mypy"))], "linters are dev"


@pytest.mark.slow
def test_the_sdist_ships_runnable_tests_and_examples(sdist: Path) -> None:
    for needed in (
        "tests/conftest.py",
        "tests/pgtest.py",
        "tests/faults.py",
        "tests/apps/jobapp.py",
        "tests/readme/use.py",
        "examples/visits.py",
        "bench/requirements.txt",
        "CHANGELOG.md",
        "README.md",
    ):
        assert (sdist / needed).is_file(), f"the sdist lacks {needed}"
    assert not list(sdist.rglob("*.pyc")) and not list(sdist.rglob("*.db"))
    shipped = {path.name for path in (sdist / "tests").glob("test_*.py")}
    assert shipped == {path.name for path in HERE.glob("test_*.py")}

    env = subprocess_env(PYTHONPATH=str(sdist / "src"))  # the sdist's own package
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=sdist,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    summary = collected.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ tests collected in .*", summary), collected.stdout
    assert (
        str(sdist / "src" / "flask_offload")
        in subprocess.run(
            [sys.executable, "-c", "import flask_offload; print(flask_offload.__file__)"],
            cwd=sdist,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    ), "the collection used the sdist's package"
