"""The contract table of docs/conformance.md names real checks, and every check is in it."""

from __future__ import annotations

import pathlib
import re

from mx_sim.conformance.catalog import all_checks

DOC = pathlib.Path(__file__).parents[3] / "docs" / "conformance.md"
CHECK_ID = re.compile(r"`((?:discovery|ipc|refit|graphs)\.[a-z0-9_]+)`")


def _table() -> str:
    text = DOC.read_text()
    start = text.index("## The contract, sentence by sentence")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_every_check_backs_a_contract_sentence_and_every_named_check_exists():
    table = _table()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 30, "the table has lost its rows"
    named = set(CHECK_ID.findall(table))
    ids = {c.id for c in all_checks()}
    assert named - ids == set(), f"the table names checks that do not exist: {named - ids}"
    assert ids - named == set(), f"checks that back no contract sentence: {ids - named}"
    for row in rows[1:]:  # every sentence names at least one check or says who checks it
        sentence, checks = row.strip("|").rsplit("|", 1)
        assert checks.strip(), f"no check for: {sentence.strip()}"
