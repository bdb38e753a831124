"""The README and the documentation are true: every Python block in README.md and docs/*.md
runs as written, and the README's two commands are the ones CI runs.

A ```` ```python ```` block runs alone: it is saved as a module and imported by a fresh
interpreter in an empty folder, as a user's ``app.py`` would be (so the instance folder is
there, and tasks get a module's name, not ``__main__``'s). A block that builds on what the
page showed before it, or needs a database, is preceded by ``<!-- test: harness NAME -->``:
it is then put at the line ``# README BLOCK`` of ``tests/readme/NAME.py``, which gives it what
it needs before and checks what it did after (a harness whose first lines say ``# needs:
postgres`` gets a throwaway database in ``READMETEST_POSTGRES_URL``).
``<!-- test: skip REASON -->`` keeps a block out; keep those few, and say why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import pgtest
from conftest import HERE, subprocess_env

ROOT = HERE.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The README, then the documentation's pages (docs/_build is the built site, not a source).
PAGES = [README, *sorted(DOCS.glob("*.md"))]
HARNESSES = HERE / "readme"
MARKER = "# README BLOCK"
DIRECTIVE = re.compile(r"<!--\s*test:\s*(harness|skip)\s+(.+?)\s*-->")


@dataclass
class Block:
    line: int  # where its code starts in its page
    code: str
    harness: str | None = None
    skip: str | None = None


def readme_blocks(text: str, page: str = "README.md") -> list[Block]:
    """The ```python blocks of ``text``, each with the directive on the line above it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() != "```python":
            index += 1
            continue
        end = lines.index("```", index + 1)
        block = Block(index + 2, "\n".join(lines[index + 1 : end]) + "\n")
        above = lines[index - 1].strip() if index else ""
        directive = DIRECTIVE.fullmatch(above)
        if above.startswith("<!--") and directive is None:
            raise ValueError(f"{page}:{index}: unknown directive {above!r}")
        if directive is not None:
            kind, value = directive.groups()
            if kind == "harness":
                block.harness = value
            else:
                block.skip = value
        blocks.append(block)
        index = end + 1
    return blocks


def page_name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass
class PageBlock:
    page: str  # README.md or docs/NAME.md
    block: Block

    @property
    def where(self) -> str:
        return f"{self.page}:{self.block.line}"


BLOCKS = [
    PageBlock(page_name(path), block)
    for path in PAGES
    for block in readme_blocks(path.read_text(), page_name(path))
]


def program(found: PageBlock) -> str:
    """The module that runs a block: the block alone, or inside its harness."""
    block = found.block
    if block.harness is None:
        return block.code
    harness = (HARNESSES / f"{block.harness}.py").read_text()
    if harness.count(MARKER) != 1:
        raise ValueError(f"tests/readme/{block.harness}.py needs one line {MARKER!r}")
    return harness.replace(MARKER, f"# {found.page}, line {block.line}:\n{block.code}")


@pytest.mark.parametrize(
    "found",
    BLOCKS,
    ids=[f"{f.page}:line{f.block.line}-{f.block.harness or 'alone'}" for f in BLOCKS],
)
def test_the_python_block_runs(found: PageBlock, tmp_path: Path) -> None:
    if found.block.skip is not None:
        pytest.skip(f"{found.where}: {found.block.skip}")
    source = program(found)
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "readme_block.py").write_text(source)
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(folder), str(HERE)]))
    for name in [name for name in env if name.startswith("FLASK_OFFLOAD_")]:
        del env[name]  # the block runs as written, not as the developer's shell configures it
    if "# needs: postgres" in source.split(MARKER)[0]:
        env["READMETEST_POSTGRES_URL"] = pgtest.new_database()
    done = subprocess.run(
        [sys.executable, "-c", "import readme_block"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{found.where} fails as written:\n{done.stdout}{done.stderr}"


def test_every_harness_serves_a_block() -> None:
    used = {found.block.harness for found in BLOCKS}
    assert used - {None} <= {path.stem for path in HARNESSES.glob("*.py")}, "a harness is missing"
    assert {path.stem for path in HARNESSES.glob("*.py")} <= used, "a harness serves no block"
    assert sum(found.block.skip is not None for found in BLOCKS) <= 2, "keep skipped blocks few"


def test_the_documentation_has_python_blocks_to_run() -> None:
    pages = {found.page for found in BLOCKS}
    assert {"README.md", "docs/quickstart.md", "docs/job-control.md"} <= pages, pages


def test_the_convention_is_understood() -> None:
    text = "<!-- test: harness use -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    first, second = readme_blocks(text)
    assert (first.harness, first.code, first.line) == ("use", "x = 1\n", 3)
    assert (second.harness, second.skip, second.code) == (None, None, "y = 2\n")
    with pytest.raises(ValueError, match="unknown directive"):
        readme_blocks("<!-- tset: harness use -->\n```python\nx = 1\n```\n")


def sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)


def test_the_two_commands_make_a_virtual_environment_and_ci_runs_the_second() -> None:
    demo, tests = sh_blocks()[:2]
    for command in (demo, tests):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && "), (
            "Debian's system Python refuses pip install outside a virtual environment"
        )
        assert command.count("\n") == 1, "one command each"
    assert "flask --app examples/visits.py run" in demo
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("no .ci/run outside a checkout (an unpacked sdist)")
    assert tests.strip() in ci.read_text(), ".ci/run runs the README's test command"
