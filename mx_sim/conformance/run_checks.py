"""Run the conformance suite through pytest: ``mx-sim conformance`` and :func:`run_checks`.

pytest with the ``mx_conformance`` plugin is the one runner: selection (``-k``), strict
expected failures, skip reasons, the JSON report and JUnit XML (``--junitxml``) all come from
it, so the command line, ``pytest --mx-adapter`` and :func:`run_checks` agree on every
outcome.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mx_sim.conformance.inputs import AdapterFactory, prepare_run
from mx_sim.conformance.plugin import InProcessAdapter
from mx_sim.conformance.report import ConformanceReport

TRACEBACK_STYLES = ("auto", "long", "short", "line", "native", "no")
# An in-process session reports to its caller: no cache, no addopts from the caller's ini, and
# no pytest-timeout (its per-test alarm would cancel the caller's own).
IN_PROCESS_ARGS = (
    "-p", "no:cacheprovider", "-p", "no:timeout", "-o", "addopts=", "-q",
    "-W", "ignore:Unknown config option:pytest.PytestConfigWarning",
)  # fmt: skip


def suite_args(
    *,
    report: Path | None = None,
    xfails: Path | None = None,
    keyword: str | None = None,
    tb: str | None = None,
    junit: Path | None = None,
    workers: str | None = None,
) -> list[str]:
    """pytest arguments for the plugin's options and pytest's own (``-k``, ``--tb``,
    ``--junitxml``, pytest-xdist's ``-n``); the plugin itself is loaded by its entry point
    name."""
    args = ["-p", "mx_conformance"]
    args += [f"--mx-report={report}"] if report else []
    args += [f"--mx-xfails={xfails}"] if xfails else []
    args += ["-k", keyword] if keyword else []
    args += [f"--tb={tb}"] if tb else []
    args += [f"--junitxml={junit}"] if junit else []
    args += ["-n", workers] if workers else []
    return args


def run_conformance(
    spec: str,
    *,
    report: Path | None = None,
    xfails: Path | None = None,
    keyword: str | None = None,
    tb: str | None = None,
    junit: Path | None = None,
    workers: str | None = None,
) -> int:
    """``mx-sim conformance``: ``pytest --mx-adapter=spec`` with the options mapped onto
    pytest's. Returns 0 when every selected check passed, 1 when one failed; ``ValueError``
    (one line, exit code 2) for anything that is not a check, before the first one runs."""
    if workers and importlib.util.find_spec("xdist") is None:
        raise ValueError(f"-n {workers} needs pytest-xdist (pip install 'mx-harness[test]')")
    outputs = [(p, o) for p, o in ((report, "--report"), (junit, "--junit")) if p]
    prepare_run(spec, xfails=xfails, outputs=outputs)
    options = {"keyword": keyword, "tb": tb, "junit": junit, "workers": workers}
    args = suite_args(report=report, xfails=xfails, **options)
    code = pytest.main([f"--mx-adapter={spec}", "-p", "no:cacheprovider", *args])
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        raise ValueError(f"-k {keyword!r} selects no conformance check")
    return {pytest.ExitCode.OK: 0, pytest.ExitCode.TESTS_FAILED: 1}.get(code, 2)


def run_checks(
    factory: AdapterFactory,
    *,
    name: str = "",
    keyword: str | None = None,
    xfails: Path | None = None,
) -> ConformanceReport:
    """Run the suite in this process against a fresh adapter from ``factory`` per check and
    return the report: a pytest session of its own (quiet; its output goes to stdout), so the
    outcomes are exactly those of ``pytest --mx-adapter``. ``keyword`` is pytest's ``-k``.
    ``ValueError`` when the factory or ``xfails`` is unusable."""
    adapter = InProcessAdapter(factory, name)
    code = pytest.main(
        [*IN_PROCESS_ARGS, *suite_args(xfails=xfails, keyword=keyword)], plugins=[adapter]
    )
    if adapter.error is not None:
        raise adapter.error
    if adapter.report is None:
        raise RuntimeError(f"the conformance session ended without a report (pytest exit {code})")
    return adapter.report
