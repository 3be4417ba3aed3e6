"""pytest11 entry point of the conformance suite (registered as ``mx_conformance``).

pytest is the suite's one runner: ``mx-sim conformance`` and :func:`run_checks` call
``pytest.main`` with this plugin. Import-light: it loads nothing heavy until an adapter is
named. With ``pytest --mx-adapter=pkg.module:factory`` (or ``MX_ADAPTER``, or an
:class:`InProcessAdapter` among ``pytest.main``'s plugins), the suite module is added to the
run; each check is one test whose id is its feature id (``test_check[refit.tied_once]``).

``--mx-xfails FILE`` marks expected failures (strict; stale entries warn) and ``--mx-report``
writes the JSON report (:mod:`mx_sim.conformance.report`) once per session, in the process
that gathers the test reports (the controller under xdist). The terminal summary has one row
per feature and, for each failing check, the contract sentence it broke.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mx_sim.conformance.inputs import AdapterFactory, RunInputs
    from mx_sim.conformance.report import ConformanceReport

SUITE = Path(__file__).with_name("suite.py")
RESULT_KEY = "mx_check_result"
RUN_KEY = pytest.StashKey["ConformanceRun"]()

# Frames of these libraries are passed over when naming the code that raised.
_LIBRARIES = frozenset({"torch", "transformers", "numpy", "pytest", "_pytest", "pluggy"})
_ADAPTER_MODULES = tuple(
    f"mx_sim.conformance.{m}" for m in ("adapters", "sharded_adapter", "hf_tp_adapter")
)


def pytest_addoption(parser):
    group = parser.getgroup("mx-conformance", "mx-harness adapter conformance suite")
    group.addoption(
        "--mx-adapter", default=None, help="adapter factory pkg.module:factory (env MX_ADAPTER)"
    )
    group.addoption("--mx-report", default=None, help="write the JSON conformance report here")
    group.addoption(
        "--mx-xfails", default=None, help="expected-failures file: 'check.id: reason' lines"
    )


class InProcessAdapter:
    """An adapter factory handed to ``pytest.main(..., plugins=[InProcessAdapter(f)])`` instead
    of a spec: the session runs the suite against ``factory`` and leaves its report (or the
    usage error that stopped it) here."""

    def __init__(self, factory: AdapterFactory, name: str = ""):
        self.factory = factory
        self.name = name
        self.report: ConformanceReport | None = None
        self.error: ValueError | None = None


def adapter_spec(config) -> str | None:
    """The adapter spec of this session: ``--mx-adapter``, else ``MX_ADAPTER``, else ``None``."""
    return config.getoption("--mx-adapter") or os.environ.get("MX_ADAPTER") or None


def pytest_configure(config):
    config.addinivalue_line("markers", "mx_check(id): a conformance check with its feature id")
    in_process = next(
        (p for p in config.pluginmanager.get_plugins() if isinstance(p, InProcessAdapter)), None
    )
    spec = adapter_spec(config)
    if in_process is None and spec is None:
        return
    from mx_sim.conformance.inputs import prepare_run

    report_path = config.getoption("--mx-report")
    junit_path = getattr(config.option, "xmlpath", None)
    outputs = [(Path(report_path), "--mx-report")] if report_path else []
    outputs += [(Path(junit_path), "--junitxml")] if junit_path else []
    xfails = config.getoption("--mx-xfails")
    try:  # one clear usage error before any check, not the same error once per check
        inputs = prepare_run(
            in_process.factory if in_process else spec,
            name=in_process.name if in_process else "",
            xfails=Path(xfails) if xfails else None,
            outputs=outputs,
        )
    except ValueError as exc:
        if in_process is not None:
            in_process.error = exc
        raise pytest.UsageError(str(exc)) from exc
    run = ConformanceRun(config, inputs, in_process)
    config.stash[RUN_KEY] = run
    config.pluginmanager.register(run, "mx-conformance-run")
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        config.args.append(str(SUITE))
    else:
        config.args[:] = [str(SUITE)]


def adapter_factory(config) -> AdapterFactory:
    """The session's adapter factory (the suite's fixture builds a fresh adapter per check)."""
    return config.stash[RUN_KEY].inputs.factory


class ConformanceRun:
    """One session's conformance run, registered as a plugin once the inputs are checked: it
    marks expected failures, puts each check's outcome on its test report, and builds the
    report where the test reports are gathered."""

    def __init__(self, config, inputs: RunInputs, in_process: InProcessAdapter | None):
        self.config = config
        self.inputs = inputs
        self.in_process = in_process
        self.outcomes: dict[str, dict] = {}  # check id -> CheckResult fields off its test report
        self.report: ConformanceReport | None = None

    def pytest_collection_modifyitems(self, items):
        if not self.inputs.xfails:
            return
        from mx_sim.conformance.catalog import all_checks
        from mx_sim.conformance.inputs import stale_entries, xfail_reason

        for entry in stale_entries(self.inputs.xfails, [c.id for c in all_checks()]):
            warnings.warn(
                f"expected-failure entry {entry!r} matches no conformance check", stacklevel=1
            )
        for item in items:
            marker = item.get_closest_marker("mx_check")
            reason = xfail_reason(self.inputs.xfails, marker.args[0]) if marker else None
            if reason is not None:
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        """Each check's outcome rides on its report (``user_properties``), so it reaches the
        process that writes the report: under xdist the controller, not the worker."""
        report = yield
        marker = item.get_closest_marker("mx_check")
        if marker is None or not (
            report.when == "call" or (report.when == "setup" and not report.passed)
        ):
            return report
        check_id = marker.args[0]
        outcome = {"id": check_id, "status": report.outcome, "reason": "", "where": None}
        xfail = xfail_reason_of(item)
        if hasattr(report, "wasxfail"):
            outcome.update(status="xfailed" if report.skipped else "xpassed", reason=xfail)
        elif report.failed and xfail is not None:  # pytest reports a strict xpass as a failure
            outcome.update(status="xpassed", reason=f"expected to fail ({xfail}) but passed")
        elif report.skipped and call.excinfo is not None:
            outcome["reason"] = str(getattr(call.excinfo.value, "msg", call.excinfo.value))
        elif report.failed and call.excinfo is not None:
            where = failure_site(call.excinfo.tb)
            outcome.update(reason=f"{call.excinfo.typename}: {call.excinfo.value}", where=where)
            report.sections.append(
                (
                    "mx-harness contract",
                    f"{check_id}: {contract_of(check_id)}\nraised in the {where}",
                )
            )
        report.user_properties.append((RESULT_KEY, outcome))
        return report

    def pytest_runtest_logreport(self, report):
        """Runs where reports are gathered (the controller under xdist)."""
        for key, value in report.user_properties:
            if key == RESULT_KEY:
                self.outcomes[value["id"]] = {**value, "seconds": report.duration}

    def pytest_sessionfinish(self, session):
        self.report = self.build_report()
        if self.in_process is not None:
            self.in_process.report = self.report
        path = self.config.getoption("--mx-report")
        if path and not hasattr(self.config, "workerinput"):
            Path(path).write_text(json.dumps(self.report.to_json(), indent=2))

    def build_report(self) -> ConformanceReport:
        from mx_sim.conformance.catalog import all_checks
        from mx_sim.conformance.inputs import stale_entries
        from mx_sim.conformance.report import CheckResult, ConformanceReport

        checks = {c.id: c for c in all_checks()}  # an xdist controller never imported the suite
        report = ConformanceReport(self.inputs.name, list(self.inputs.capabilities))
        report.stale_xfails = stale_entries(self.inputs.xfails, checks)
        report.config = {
            "adapter": self.inputs.name,
            "keyword": self.config.option.keyword or None,
            "xfails_file": self.inputs.xfails_path,
            "xdist_workers": xdist_workers(self.config),
        }
        for check_id, outcome in sorted(self.outcomes.items()):
            check = checks[check_id]
            report.results.append(CheckResult(**outcome, feature=check.feature, contract=check.doc))
        return report

    def pytest_terminal_summary(self, terminalreporter):
        if self.report is None:
            return
        failed = self.report.failed_ids()
        terminalreporter.section("mx-harness conformance, per feature")
        terminalreporter.write_line(self.report.table())
        for line in self.report.failure_lines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"{len(failed)} of {len(self.report.results)} checks failed")
        path = self.config.getoption("--mx-report")
        if path:
            terminalreporter.write_line(f"JSON report: {path}")


def contract_of(check_id: str) -> str:
    """The catalog's sentence for ``check_id`` (the first paragraph of its docstring)."""
    from mx_sim.conformance.catalog import CHECKS

    return CHECKS[check_id].doc if check_id in CHECKS else ""


def xfail_reason_of(item) -> str | None:
    """The reason of the expected-failure entry that marked ``item`` (strict xfail)."""
    marker = item.get_closest_marker("xfail")
    return marker.kwargs.get("reason") if marker is not None else None


def xdist_workers(config) -> int:
    """How many xdist workers the session runs on (0: no xdist)."""
    workers = getattr(config.option, "numprocesses", None)
    return workers if isinstance(workers, int) else 0


def failure_site(tb: TracebackType | None) -> str:
    """Whose code raised: the innermost frame outside the standard library, torch and pytest,
    as ``check (refit.py:120)``, ``reference``, ``simulator`` or ``adapter`` (anything else:
    the engine's code, including the reference adapters)."""
    for frame, lineno in reversed(list(traceback.walk_tb(tb))):
        module = frame.f_globals.get("__name__", "")
        top = module.split(".")[0]
        if top in _LIBRARIES or top in sys.stdlib_module_names:
            continue
        site = f"{Path(frame.f_code.co_filename).name}:{lineno}"
        if module.startswith("mx_sim.conformance.checks"):
            return f"check ({site})"
        if top == "mx_reference":
            return f"reference ({site})"
        if top == "mx_sim" and not module.startswith(_ADAPTER_MODULES):
            return f"simulator ({site})"
        return f"adapter ({site})"
    return "adapter"
