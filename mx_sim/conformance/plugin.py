"""pytest11 entry point of the conformance suite (registered as ``mx_conformance``).

Import-light: it loads nothing heavy until an adapter is named. With
``pytest --mx-adapter=pkg.module:factory`` (or ``MX_ADAPTER``), the suite module is added to
the run; each check is one test whose id is its feature id (``test_check[refit.tied_once]``).
``--mx-xfails FILE`` marks expected failures (strict; stale entries warn) and
``--mx-report PATH`` writes the JSON report. The terminal summary has one row per feature.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

SUITE = Path(__file__).with_name("suite.py")
RESULT_KEY = "mx_check_result"
_RESULTS: dict[str, tuple[str, str, float]] = {}  # check id -> outcome, in this process


def pytest_addoption(parser):
    group = parser.getgroup("mx-conformance", "mx-harness adapter conformance suite")
    group.addoption(
        "--mx-adapter", default=None, help="adapter factory pkg.module:factory (env MX_ADAPTER)"
    )
    group.addoption("--mx-report", default=None, help="write the JSON conformance report here")
    group.addoption(
        "--mx-xfails", default=None, help="expected-failures file: 'check.id: reason' lines"
    )


def adapter_spec(config) -> str | None:
    return config.getoption("--mx-adapter") or os.environ.get("MX_ADAPTER") or None


def pytest_configure(config):
    config.addinivalue_line("markers", "mx_check(id): a conformance check with its feature id")
    spec = adapter_spec(config)
    if spec is None:
        return
    from mx_sim.conformance.run_checks import check_factory, load_factory, load_xfails
    from mx_sim.report import check_writable

    try:  # one clear usage error before any check, not the same error once per check
        check_factory(spec, load_factory(spec))
        if config.getoption("--mx-report"):
            check_writable(Path(config.getoption("--mx-report")), "--mx-report")
        if config.getoption("--mx-xfails"):
            load_xfails(Path(config.getoption("--mx-xfails")))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from exc
    _RESULTS.clear()
    config._mx_results = _RESULTS
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        config.args.append(str(SUITE))
    else:
        config.args[:] = [str(SUITE)]


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--mx-xfails")
    if adapter_spec(config) is None or not path:
        return
    from mx_sim.conformance.catalog import all_checks
    from mx_sim.conformance.run_checks import matches_entry, read_xfails, stale_entries

    xfails = read_xfails(Path(path))
    for entry in stale_entries(xfails, all_checks()):
        warnings.warn(
            f"expected-failure entry {entry!r} matches no conformance check", stacklevel=1
        )
    for item in items:
        marker = item.get_closest_marker("mx_check")
        if marker is None:
            continue
        reason = next((r for e, r in xfails.items() if matches_entry(e, marker.args[0])), None)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Each check's outcome rides on its report (``user_properties``), so it reaches the
    process that writes the report: under xdist the controller, not the worker that ran it."""
    report = yield
    marker = item.get_closest_marker("mx_check")
    if marker is None or getattr(item.config, "_mx_results", None) is None:
        return report
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            status = "xfailed" if report.skipped else "xpassed"
        elif report.failed and str(report.longrepr).startswith("[XPASS(strict)]"):
            status = "xpassed"  # pytest reports a strict xpass as a plain failure
        else:
            status = report.outcome
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2]
        elif report.failed and call.excinfo is not None:
            reason = f"{call.excinfo.typename}: {call.excinfo.value}"
        report.user_properties.append((RESULT_KEY, [marker.args[0], status, reason]))
    return report


def pytest_runtest_logreport(report):
    """Runs where reports are gathered (the controller under xdist): keep each check's outcome."""
    for key, value in report.user_properties:
        if key == RESULT_KEY:
            check_id, status, reason = value
            _RESULTS[check_id] = (status, reason, report.duration)


def _report(config):
    from mx_sim.conformance.catalog import all_checks
    from mx_sim.conformance.run_checks import CheckResult, ConformanceReport

    checks = {c.id: c for c in all_checks()}  # an xdist controller never imported the suite
    report = ConformanceReport(adapter_spec(config) or "", [])
    for check_id, (status, reason, seconds) in sorted(config._mx_results.items()):
        report.results.append(
            CheckResult(check_id, checks[check_id].feature, status, reason, seconds)
        )
    return report


def pytest_terminal_summary(terminalreporter, config):
    if getattr(config, "_mx_results", None) is None:
        return
    report = _report(config)
    terminalreporter.section("mx-harness conformance, per feature")
    terminalreporter.write_line(report.table())
    path = config.getoption("--mx-report")
    if path:
        Path(path).write_text(json.dumps(report.to_json(), indent=2))
        terminalreporter.write_line(f"JSON report: {path}")
