"""README's settings table and the Settings class agree: every setting is in the table,
every name in the table is a setting, and a default the table gives as a literal is the
class's own (docs that drift from the code mislead the operator who reads them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from semantic_server.config import Settings

README = Path(__file__).parents[2] / "README.md"
NAME = re.compile(r"SEMANTIC_[A-Z0-9_]+")


def _rows() -> list[tuple[list[str], list[str]]]:
    """(names, defaults) of each row of the settings table; a literal default is in
    backticks, one per name, comma-separated."""
    section = README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `SEMANTIC_"):
            cells = line.split("|")
            rows.append((NAME.findall(cells[1]), [d.strip() for d in cells[2].split(",")]))
    return rows


def _same(text: str, value: object) -> bool:
    """Whether the table's ``text`` says ``value``."""
    if text.startswith("["):
        return json.loads(text) == value
    if text.startswith("~"):
        return str(Path(text).expanduser()) == str(value)
    try:
        return float(text) == float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return text in (str(value), str(value).lower())


def test_the_table_lists_every_setting_and_nothing_else():
    documented = [name for names, _ in _rows() for name in names]
    fields = {f"SEMANTIC_{field.upper()}" for field in Settings.model_fields}
    assert len(documented) == len(set(documented)), "a setting listed twice"
    assert set(documented) == fields, (sorted(fields - set(documented)),
                                       sorted(set(documented) - fields))


def test_literal_defaults_in_the_table_are_the_defaults():
    checked = 0
    for names, defaults in _rows():
        if len(defaults) != len(names):
            continue  # a prose default ("a quarter of free RAM") for several names
        for name, default in zip(names, defaults, strict=True):
            literal = re.fullmatch(r"`(.*)`", default)
            if literal is None:
                continue
            field = Settings.model_fields[name.removeprefix("SEMANTIC_").lower()]
            value = field.default_factory() if field.default_factory else field.default
            value = getattr(value, "value", value)  # an enum's own value
            if hasattr(value, "get_secret_value"):  # a URL that may hold a password
                value = value.get_secret_value()
            assert _same(literal.group(1), value), (name, literal.group(1), value)
            checked += 1
    assert checked >= 20  # the table gives most defaults literally
