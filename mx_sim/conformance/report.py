"""The conformance report: each check's outcome, the per-feature table and the JSON document.

The pytest plugin builds one :class:`ConformanceReport` per session (the xdist controller under
``-n``) and writes it with :meth:`ConformanceReport.to_json`. Its layout is versioned by
:data:`SCHEMA_VERSION`:

- ``schema_version``, ``created_utc`` (ISO 8601), ``versions`` (Python and the packages the
  run depends on, ``null`` where one is not installed);
- ``config``: ``adapter``, ``keyword`` (pytest's ``-k``), ``xfails_file``, ``xdist_workers``
  (0 without xdist), with their JSON types (strings, ints, ``null``);
- ``adapter``, ``capabilities``, ``ok`` (at least one check ran and none failed),
  ``summary`` (feature -> status -> count), ``stale_xfails``;
- ``checks``: per check ``id``, ``feature``, ``status``, ``reason``, ``seconds``,
  ``contract`` (the catalog's sentence) and ``where`` (for a failure: whose code raised,
  ``check``, ``reference``, ``simulator`` or ``adapter``, and its file and line, as in
  ``check (ipc.py:120)``; ``null`` otherwise).
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from mx_sim.conformance.catalog import FEATURES

SCHEMA_VERSION = 1
STATUSES = ("passed", "failed", "skipped", "xfailed", "xpassed")
FAILING = ("failed", "xpassed")
REPORTED_PACKAGES = ("mx-harness", "torch", "transformers", "nixl", "pytest", "pytest-xdist")


@dataclass
class CheckResult:
    """One check's outcome; ``where`` is set for failures only."""

    id: str
    feature: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    contract: str = ""
    where: str | None = None


@dataclass
class ConformanceReport:
    """Every check's outcome for one adapter, with the run's configuration."""

    adapter: str
    capabilities: list[str]
    results: list[CheckResult] = field(default_factory=list)
    stale_xfails: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """At least one check ran and none failed."""
        return bool(self.results) and not self.failed_ids()

    def failed_ids(self) -> list[str]:
        """Ids of the checks that failed or passed against an expected failure."""
        return [r.id for r in self.results if r.status in FAILING]

    def summary(self) -> dict[str, dict[str, int]]:
        """Feature -> status -> number of checks."""
        table = {f: dict.fromkeys(STATUSES, 0) for f in FEATURES}
        for r in self.results:
            table[r.feature][r.status] += 1
        return table

    def to_json(self) -> dict[str, Any]:
        """The JSON document (see the module docstring), stamped with the time of the call."""
        return {
            "schema_version": SCHEMA_VERSION,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(),
            "config": self.config,
            "adapter": self.adapter,
            "capabilities": self.capabilities,
            "ok": self.ok,
            "summary": self.summary(),
            "stale_xfails": self.stale_xfails,
            "checks": [asdict(r) for r in self.results],
        }

    def table(self) -> str:
        """One row per feature, one column per status."""
        lines = [f"{'feature':<10} " + " ".join(f"{s:>8}" for s in STATUSES)]
        for feature, counts in self.summary().items():
            lines.append(f"{feature:<10} " + " ".join(f"{counts[s]:>8}" for s in STATUSES))
        return "\n".join(lines)

    def failure_lines(self) -> list[str]:
        """For each failing check: its status, id and reason, the contract it broke and,
        for a failure, whose code raised."""
        lines = []
        for r in self.results:
            if r.status in FAILING:
                lines.append(f"{r.status.upper():<8} {r.id}  {r.reason}")
                lines.append(f"         contract: {r.contract}")
                lines += [f"         raised in the {r.where}"] if r.where else []
        return lines


def package_versions() -> dict[str, str | None]:
    """Python's version and each of :data:`REPORTED_PACKAGES`' (``None``: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in REPORTED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
