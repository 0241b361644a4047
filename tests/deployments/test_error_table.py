"""errors.ERRORS is the one error table: the service raises its kinds (no (status, code) literal at a call
site), and docs/api.md's error table lists every kind with its status (retryable ones with Retry-After)."""

from __future__ import annotations

import re
from pathlib import Path

from deployments import errors

ROOT = Path(__file__).resolve().parents[2]
LITERAL = re.compile(r'ServiceError\(\s*(\d{3}),\s*"([a-z0-9_]+)"')


def literal_sites() -> list[str]:
    found = []
    for path in Path(errors.__file__).parent.rglob("*.py"):
        for status, code in LITERAL.findall(path.read_text()):
            found.append(f"{path.relative_to(ROOT)}: {status} {code}")
    return found


def api_md_rows() -> list[tuple[set[int], str]]:
    rows = []
    for line in (ROOT / "docs" / "api.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"\d{3}(, \d{3})*", cells[0]):
            rows.append(({int(s) for s in cells[0].split(", ")}, cells[1] + " | " + cells[2]))
    return rows


def test_the_literal_scan_finds_a_literal(tmp_path):
    """The scan would see a call site written the old way (a scan that finds nothing would always pass)."""
    assert LITERAL.findall('raise ServiceError(400, "invalid_base64", "x")') == [("400", "invalid_base64")]


def test_no_call_site_spells_a_status_and_code():
    assert not literal_sites()


def test_the_table_has_one_row_per_status_and_code():
    keys = [(k.status, k.code) for k in errors.ERRORS]
    assert len(keys) == len(set(keys)) and len(keys) >= 20
    assert errors.INVALID_PARAMETER("x", field="steps").body() == {
        "error": {"code": "invalid_parameter", "message": "x", "field": "steps"}}
    assert errors.INVALID_PARAMETER("x").status == 422


def test_every_kind_is_in_the_api_docs():
    rows = api_md_rows()
    missing = sorted((k.status, k.code) for k in errors.ERRORS
                     if not any(k.status in statuses and f"`{k.code}`" in text for statuses, text in rows))
    assert not missing, missing


def test_retryable_kinds_say_retry_after_in_the_docs():
    rows = api_md_rows()
    for kind in (k for k in errors.ERRORS if k.retryable):
        assert any(kind.status in st and f"`{kind.code}`" in text and "Retry-After" in text for st, text in rows), kind
    assert errors.RETRY_LATER == {"Retry-After": str(errors.RETRY_AFTER_S)}
