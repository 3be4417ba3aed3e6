"""Result records shared by scenarios (``mx-sim run``) and benchmarks (``mx-sim bench``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

REFIT_PHASES = ("alloc", "register", "pull", "translate", "verify", "apply")
"""The refit cycle phases reports show, in cycle order (each with its seconds)."""


@dataclass
class ScenarioResult:
    """One row of the ``mx-sim run`` table.

    ``timings`` holds per-phase seconds (for refit: :data:`REFIT_PHASES` and ``total``), summed
    or listed per cycle in ``details`` as the scenario sees fit.
    """

    name: str
    passed: bool
    detail: str = ""
    bytes_moved: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchResult:
    """One benchmark: what was measured, the goal and whether it was met."""

    name: str
    metrics: dict[str, float]
    goals: dict[str, str] = field(default_factory=dict)
    met: bool = True
    notes: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
