"""The documentation keeps up with the code: every ``OFFLOAD_*`` key the code reads is in the
configuration reference (and nothing else is), and every ``flask offload`` command and option
its shell blocks show exists, and every public name is in the API reference. (Its Python
blocks run in tests/test_readme.py.)"""

from __future__ import annotations

import re
from pathlib import Path

from flask import Flask
from flask.config import Config

import flask_offload
from flask_offload.cli import offload_cli
from test_readme import PAGES, ROOT

SOURCE = Path(flask_offload.__file__).parent
REFERENCE = ROOT / "docs" / "configuration.md"
KEY = re.compile(r"\bOFFLOAD_[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def keys_in_the_source() -> set[str]:
    """Every ``OFFLOAD_*`` name the package's code mentions (a key read through a variable
    would escape this: the test below checks the scan against what ``init_app`` reads)."""
    return {key for path in SOURCE.rglob("*.py") for key in KEY.findall(path.read_text())}


def keys_in_the_reference() -> set[str]:
    return set(re.findall(r"^### `(OFFLOAD_\w+)`$", REFERENCE.read_text(), re.M))


class RecordingConfig(Config):
    """An app config that notes every key read or defaulted."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.read: set[str] = set()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> object:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: object = None) -> object:
        self.read.add(key)
        return super().get(key, default)

    def setdefault(self, key: str, default: object = None) -> object:
        self.read.add(key)
        return super().setdefault(key, default)


def test_every_key_the_code_reads_is_in_the_configuration_reference() -> None:
    missing = keys_in_the_source() - keys_in_the_reference()
    assert not missing, f"docs/configuration.md lacks {sorted(missing)}"
    stale = keys_in_the_reference() - keys_in_the_source()
    assert not stale, f"docs/configuration.md documents keys no code reads: {sorted(stale)}"


def test_the_scan_sees_every_key_init_app_reads(tmp_path: Path) -> None:
    class App(Flask):
        config_class = RecordingConfig

    app = App(__name__, instance_path=str(tmp_path))
    app.config.update(OFFLOAD_URL="memory://", OFFLOAD_WORKERS=0, OFFLOAD_DASHBOARD=True)
    flask_offload.Offload(app)
    assert isinstance(app.config, RecordingConfig)
    read = {key for key in app.config.read if key.startswith("OFFLOAD_")}
    assert len(read) > 10, read
    assert read <= keys_in_the_source(), sorted(read - keys_in_the_source())


def offload_commands(page: Path) -> list[tuple[str, list[str]]]:
    """``(command, options)`` for each ``flask … offload COMMAND …`` of the page's shell blocks;
    ``a ID | b ID`` names two commands, ``[--x | --y]`` two options of one."""
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```sh\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.splitlines():
            match = re.search(r"\bflask (?:--app \S+ )?offload (.*)", line.split("#")[0])
            if match is None:
                continue
            for part in match.group(1).split(" | "):
                words = part.strip(" []").split()
                if words and not words[0].startswith("-"):
                    found.append((words[0], []))
                found[-1][1].extend(w.strip("[]") for w in words if w.startswith(("-", "[-")))
    return found


def test_every_offload_command_the_docs_show_exists() -> None:
    shown = [(page, found) for page in PAGES for found in offload_commands(page)]
    assert len(shown) > 10, shown
    for page, (name, options) in shown:
        command = offload_cli.commands.get(name)
        assert command is not None, f"{page.name}: no command `flask offload {name}`"
        known = {opt for param in command.params for opt in param.opts}
        unknown = [option.split("=")[0] for option in options if option.split("=")[0] not in known]
        assert not unknown, f"{page.name}: `flask offload {name}` has no option {unknown}"


def test_the_wheel_the_install_steps_name_is_this_versions() -> None:
    """The steps name the wheel ``python -m build`` writes (setuptools' normalised name)."""
    named = {
        (page.name, wheel)
        for page in PAGES
        for wheel in re.findall(r"flask_offload-\S+?\.whl", page.read_text(), re.I)
    }
    assert named, "the install steps show the built wheel"
    expected = f"flask_offload-{flask_offload.__version__}-py3-none-any.whl"
    assert {wheel for _, wheel in named} == {expected}, named


def test_every_public_name_is_in_the_api_reference() -> None:
    reference = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^\.\. (?:auto\w+|py:\w+):: (\w+)", reference, re.M))
    missing = set(flask_offload.__all__) - documented
    assert not missing, f"docs/api.md lacks {sorted(missing)}"
