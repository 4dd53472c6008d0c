"""Each DeftConfig field is described once (its `help` metadata); the READMEs show those descriptions. These tests
fail when the README's configuration table (or the Axolotl plugin's `deft:` table) and the fields disagree."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import pytest

from deft_common import DeftConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(\w+)` \| `(.*?)` \| (.*) \|$")


def table_rows(path: pathlib.Path, heading: str) -> dict[str, tuple[str, str]]:
    """{name: (default cell, meaning cell)} of the first table after `heading` in the markdown file."""
    lines = path.read_text().splitlines()
    start = lines.index(heading)
    rows, in_table = {}, False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            match = ROW.match(line)
            if match:
                rows[match.group(1)] = (match.group(2), match.group(3).replace("\\|", "|"))
        elif in_table:
            break
    return rows


def check_table(rows: dict, parse_default) -> None:
    fields = dataclasses.fields(DeftConfig)
    assert [name for name in rows if name != "enabled"] == [f.name for f in fields], "the rows must be the fields, in order"
    for f in fields:
        default, meaning = rows[f.name]
        assert parse_default(default) == f.default, f"{f.name}: the table says default {default}, the field {f.default!r}"
        assert meaning == f.metadata["help"], f"{f.name}: the table's meaning is not DeftConfig.help({f.name!r})"


def test_readme_configuration_table_matches_the_fields():
    check_table(table_rows(ROOT / "README.md", "## Configuration"), ast.literal_eval)


def test_axolotl_readme_shows_every_field():
    yaml = pytest.importorskip("yaml")
    check_table(table_rows(ROOT / "plugins" / "deft_axolotl" / "README.md", "## The `deft:` block"), yaml.safe_load)


def test_every_field_has_help_and_help_names_unknown_fields():
    for f in dataclasses.fields(DeftConfig):
        assert f.metadata.get("help", "").strip(), f"DeftConfig.{f.name} has no help metadata"
    with pytest.raises(ValueError, match="no field 'cofe'"):
        DeftConfig.help("cofe")
