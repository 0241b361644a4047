"""Every (status, code) the service raises is in errors.py's status table and in docs/api.md's error table."""

from __future__ import annotations

import re
from pathlib import Path

from deployments import errors

ROOT = Path(__file__).resolve().parents[2]


def raised_codes() -> set[tuple[int, str]]:
    pattern = re.compile(r'ServiceError\(\s*(\d{3}),\s*"([a-z_]+)"')
    found = set()
    for path in Path(errors.__file__).parent.rglob("*.py"):
        found |= {(int(s), c) for s, c in pattern.findall(path.read_text())}
    return found


def docstring_table() -> dict[int, str]:
    """``errors.py``'s table: each status with the text up to the next status."""
    text = errors.__doc__.split("Status codes:", 1)[1]
    parts = re.split(r"(?:^|\s)(\d{3}) ", text)
    table: dict[int, str] = {}
    for status, words in zip(parts[1::2], parts[2::2]):
        table[int(status)] = table.get(int(status), "") + words
    return table


def api_md_rows() -> list[tuple[set[int], str]]:
    rows = []
    for line in (ROOT / "docs" / "api.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"\d{3}(, \d{3})*", cells[0]):
            rows.append(({int(s) for s in cells[0].split(", ")}, cells[1]))
    return rows


def test_the_scan_finds_the_codes():
    codes = raised_codes()
    assert {(400, "bad_request"), (415, "unsupported_media_type"), (422, "invalid_parameter")} <= codes


def test_every_raised_code_is_in_the_errors_module_table():
    table = docstring_table()
    missing = sorted((s, c) for s, c in raised_codes() if c not in table.get(s, ""))
    assert not missing, missing


def test_every_raised_code_is_in_the_api_docs():
    rows = api_md_rows()
    missing = sorted((s, c) for s, c in raised_codes()
                     if not any(s in statuses and f"`{c}`" in codes for statuses, codes in rows))
    assert not missing, missing
