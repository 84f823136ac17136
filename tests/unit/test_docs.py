"""docs/configuration.md lists every setting as the code defines it: a field added, renamed or re-described
without `make docs` fails here."""

from __future__ import annotations

from server.cli import configuration_markdown, settings_flag
from server.settings import Settings
from tests.conftest import REPO


def test_the_configuration_page_is_the_settings_as_they_are() -> None:
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == configuration_markdown(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_has_its_row() -> None:
    rows = [line for line in configuration_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) == len(Settings.model_fields)
    for name in Settings.model_fields:
        assert any(row.startswith(f"| `{name.upper()}` | `{settings_flag(name)}` |") for row in rows), name
