"""The runnable refit example that opens docs/refit.md runs as it stands, so it cannot rot."""

from __future__ import annotations

import pathlib
import re

DOC = pathlib.Path(__file__).parents[2] / "docs" / "refit.md"


def test_the_refit_doc_example_runs(capsys):
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[:1]
    assert 20 <= len(code.strip().splitlines()) <= 35
    exec(compile(code, str(DOC), "exec"), {})
    assert re.match(r"v1: \d+ bytes pulled, [\d.]+ s", capsys.readouterr().out)
