"""What a user reads must match what exists: every command in the README, no pointer outside the repo."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from prepare.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_command_table_has_every_subcommand() -> None:
    for name in SUBCOMMANDS:
        assert f"`dlrm-prepare {name}" in README, f"README does not list dlrm-prepare {name}"
    for name in ("check-config", "status", "keygen"):
        assert f"dlrm-daemon {name}" in README, f"README does not list dlrm-daemon {name}"


def test_real_data_conversion_uses_the_reference_dictionaries() -> None:
    # tb00_40M.pt needs contiguous dictionary ids over all 24 days, not ids hashed into the tables
    for text in (README, (REPO / "docs" / "OPERATIONS.md").read_text()):
        assert "--dictionary-days" in text and "--first-half" in text


def test_no_document_points_outside_the_repository() -> None:
    for path in [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]:
        assert not re.search(r"\.\./shared|SPEC\.md", path.read_text()), f"{path.name} points outside the repo"


def test_license_is_apache_2() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "Apache-2.0"}
    assert "Apache-2.0" in README


def test_readme_says_what_make_test_installs_as_root() -> None:
    assert "apt-get" in README and "root" in README
