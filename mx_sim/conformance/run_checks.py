"""Run conformance checks against an adapter, without pytest, and report per feature.

``run_checks`` is what the pytest plugin, ``mx-sim conformance`` and the mutant self-test share:
each check gets a fresh adapter from the factory; results are ``passed``, ``failed``,
``skipped`` (undeclared capability), ``xfailed`` or ``xpassed`` (an expected failure that now
passes counts as a failure, so stale entries get cleaned up).
"""

from __future__ import annotations

import importlib
import json
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mx_sim.conformance.catalog import FEATURES, Check, all_checks
from mx_sim.report import check_writable

STATUSES = ("passed", "failed", "skipped", "xfailed", "xpassed")
FAILING = ("failed", "xpassed")


def load_factory(spec: str) -> Callable[[], object]:
    """``pkg.module:factory`` -> the factory callable; ValueError naming the spec otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"adapter spec {spec!r} must look like pkg.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"adapter spec {spec!r}: cannot import {module_name!r} ({exc})") from exc
    except Exception as exc:  # the adapter's own module failed: a usage error, not a check
        raise ValueError(
            f"adapter spec {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"adapter spec {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def check_factory(spec: str, factory: Callable[[], object]) -> None:
    """Call ``factory`` once: ``ValueError`` unless it returns an adapter (it has
    ``capabilities``), so a broken factory is one usage error, not a failure per check."""
    try:
        adapter = factory()
    except Exception as exc:
        raise ValueError(
            f"adapter spec {spec!r}: the factory raised {type(exc).__name__}: {exc}"
        ) from exc
    if not hasattr(adapter, "capabilities"):
        raise ValueError(
            f"adapter spec {spec!r}: the factory returned {type(adapter).__name__}, "
            "not an engine adapter (no 'capabilities')"
        )


def load_xfails(path: Path) -> dict[str, str]:
    """:func:`read_xfails`, with a missing or unreadable file a ``ValueError`` naming it."""
    try:
        return read_xfails(path)
    except OSError as exc:
        raise ValueError(f"expected-failures file {str(path)!r}: {exc.strerror}") from exc


def read_xfails(path: Path) -> dict[str, str]:
    """Expected failures as data: one ``check.id: reason`` per line; lines starting with ``#``
    are comments (a ``#`` inside a reason, as in "vLLM #32104", is kept).

    An entry names a check id or a prefix of ids (``refit.moe``). Entries that match no check
    are reported with a warning by :func:`run_checks`.
    """
    entries: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        check_id, sep, reason = line.partition(":")
        if not sep or not check_id.strip():
            raise ValueError(f"{path}:{number}: expected 'check.id: reason', got {raw!r}")
        entries[check_id.strip()] = reason.strip() or "expected failure"
    return entries


def matches_entry(entry: str, check_id: str) -> bool:
    return check_id == entry or check_id.startswith(entry + ".")


@dataclass
class CheckResult:
    id: str
    feature: str
    status: str
    reason: str = ""
    seconds: float = 0.0


@dataclass
class ConformanceReport:
    adapter: str
    capabilities: list[str]
    results: list[CheckResult] = field(default_factory=list)
    stale_xfails: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """At least one check ran and none failed."""
        return bool(self.results) and not any(r.status in FAILING for r in self.results)

    def failed_ids(self) -> list[str]:
        return [r.id for r in self.results if r.status in FAILING]

    def summary(self) -> dict[str, dict[str, int]]:
        table = {f: dict.fromkeys(STATUSES, 0) for f in FEATURES}
        for r in self.results:
            table[r.feature][r.status] += 1
        return table

    def to_json(self) -> dict:
        return {
            "adapter": self.adapter,
            "capabilities": self.capabilities,
            "ok": self.ok,
            "summary": self.summary(),
            "stale_xfails": self.stale_xfails,
            "checks": [asdict(r) for r in self.results],
        }

    def table(self) -> str:
        lines = [f"{'feature':<10} " + " ".join(f"{s:>8}" for s in STATUSES)]
        for feature, counts in self.summary().items():
            lines.append(f"{feature:<10} " + " ".join(f"{counts[s]:>8}" for s in STATUSES))
        return "\n".join(lines)


def run_check(check: Check, adapter, xfail_reason: str | None) -> CheckResult:
    missing = check.missing_capabilities(frozenset(adapter.capabilities))
    if missing:
        reason = f"adapter does not declare capability {', '.join(missing)}"
        return CheckResult(check.id, check.feature, "skipped", reason)
    start = time.perf_counter()
    try:
        check.fn(adapter)
    except Exception as exc:
        seconds = time.perf_counter() - start
        detail = f"{type(exc).__name__}: {exc}".strip()
        if xfail_reason is not None:
            return CheckResult(check.id, check.feature, "xfailed", xfail_reason, seconds)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        detail += f" ({Path(where.filename).name}:{where.lineno})"
        return CheckResult(check.id, check.feature, "failed", detail, seconds)
    seconds = time.perf_counter() - start
    if xfail_reason is not None:
        reason = f"expected to fail ({xfail_reason}) but passed"
        return CheckResult(check.id, check.feature, "xpassed", reason, seconds)
    return CheckResult(check.id, check.feature, "passed", "", seconds)


def select_checks(keyword: str | None) -> list[Check]:
    checks = all_checks()
    if keyword:
        checks = [c for c in checks if keyword in c.id]
        if not checks:
            raise ValueError(f"no conformance check id contains {keyword!r}")
    return checks


def stale_entries(xfails: dict[str, str], checks: Iterable[Check]) -> list[str]:
    ids = [c.id for c in checks]
    return sorted(e for e in xfails if not any(matches_entry(e, i) for i in ids))


def run_checks(
    factory: Callable[[], object],
    *,
    name: str = "",
    keyword: str | None = None,
    xfails: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> ConformanceReport:
    """Run every selected check against a fresh adapter from ``factory``."""
    xfails = xfails or {}
    checks = select_checks(keyword)
    probe = factory()
    report = ConformanceReport(name or type(probe).__name__, sorted(probe.capabilities))
    report.stale_xfails = stale_entries(xfails, all_checks())
    for entry in report.stale_xfails:
        warnings.warn(
            f"expected-failure entry {entry!r} matches no conformance check", stacklevel=2
        )
    for check in checks:
        reason = next((r for e, r in xfails.items() if matches_entry(e, check.id)), None)
        result = run_check(check, factory(), reason)
        report.results.append(result)
        if log:
            log(f"{result.status.upper():<8} {result.id}  {result.reason}")
    return report


def run_conformance(
    spec: str, *, report: Path | None = None, xfail: Path | None = None, keyword: str | None = None
) -> int:
    """``mx-sim conformance``: print each check, the per-feature table, write the JSON report.
    Everything that is not a check (the adapter, the files) is checked before the first one."""
    factory = load_factory(spec)
    check_factory(spec, factory)
    if report:
        check_writable(report, "report")
    xfails = load_xfails(xfail) if xfail else None
    result = run_checks(factory, name=spec, keyword=keyword, xfails=xfails, log=print)
    print()
    print(result.table())
    if report:
        report.write_text(json.dumps(result.to_json(), indent=2))
        print(f"JSON report: {report}")
    failed = result.failed_ids()
    print(f"{len(failed)} of {len(result.results)} checks failed")
    return 1 if failed else 0
