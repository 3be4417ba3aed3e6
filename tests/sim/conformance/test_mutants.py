"""The conformance suite has teeth: every known-bug mutant in ``tests/mutants`` fails at least
one check, and the reference adapter fails none. The run prints "N/N mutants caught"."""

from __future__ import annotations

import fnmatch
import importlib
import pathlib
import pkgutil
import re

import mutants
import pytest

from mx_sim.conformance.adapters import reference_adapter
from mx_sim.conformance.hf_tp_adapter import hf_tp_adapter
from mx_sim.conformance.run_checks import run_checks
from mx_sim.conformance.sharded_adapter import vllm_shaped_adapter

MUTANTS = sorted(m.name for m in pkgutil.iter_modules(mutants.__path__))
DOC = pathlib.Path(__file__).parents[3] / "docs" / "conformance.md"


def _caught_by_in_docs() -> dict[str, list[str]]:
    """docs/conformance.md's mutant table: mutant -> the check ids (or ``*`` patterns) of its
    "caught by" column."""
    rows = [line.split("|") for line in DOC.read_text().splitlines() if line.startswith("| `")]
    return {
        row[1].strip().strip("`"): re.findall(r"`([a-z]+\.[a-z0-9_*]+)`", row[-2])
        for row in rows
        if len(row) >= 5 and row[1].strip().strip("`") in MUTANTS
    }


CAUGHT_BY = _caught_by_in_docs()


def test_every_mutant_is_in_the_docs_with_the_checks_that_catch_it():
    assert sorted(CAUGHT_BY) == MUTANTS
    assert all(CAUGHT_BY.values()), {m: c for m, c in CAUGHT_BY.items() if not c}


def test_there_is_a_mutant_per_bug_class():
    assert len(MUTANTS) >= 32, MUTANTS
    assert len([m for m in MUTANTS if m.startswith("sharded_")]) == 7, MUTANTS


def test_reference_adapter_passes_every_check_but_the_sharded_ones():
    report = run_checks(reference_adapter)
    assert report.failed_ids() == [], [r for r in report.results if r.status == "failed"]
    skipped = [r.id for r in report.results if r.status == "skipped"]
    assert skipped and all(s.startswith("refit.sharded_") for s in skipped), skipped


@pytest.mark.timeout(240)
@pytest.mark.parametrize("factory", [vllm_shaped_adapter, hf_tp_adapter])
def test_sharded_reference_adapters_pass_every_check(factory):
    """The vLLM-shaped engine (ranks as threads, declared layout, no forward) and
    transformers' TP engine (a process per rank, DTensor placements, its own forward)."""
    report = run_checks(factory)
    assert report.failed_ids() == [], [r for r in report.results if r.status == "failed"]
    assert not [r.id for r in report.results if r.status == "skipped"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_is_caught(name):
    module = importlib.import_module(f"mutants.{name}")
    report = run_checks(module.factory, name=name)
    caught_by = report.failed_ids()
    assert caught_by, f"mutant {name!r} ({module.__doc__.splitlines()[0]}) passed every check"
    named = CAUGHT_BY[name]  # what docs/conformance.md says catches it
    assert any(fnmatch.fnmatch(c, pattern) for c in caught_by for pattern in named), (
        f"mutant {name!r}: the docs name {named}, it was caught by {caught_by}"
    )
