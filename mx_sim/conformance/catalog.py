"""The check registry: plain functions with feature ids and required capabilities.

A check is ``fn(adapter) -> None`` that raises (``AssertionError`` or anything else) when the
adapter misbehaves. Ids look like ``feature.check`` (``refit.mixed_tp_bit_exact``); the part
before the first dot is the feature the report groups by. A check that needs a capability the
adapter does not declare is skipped with a reason naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

CheckFn = Callable[[object], None]

FEATURES = ("discovery", "ipc", "refit", "graphs")


@dataclass(frozen=True)
class Check:
    id: str
    fn: CheckFn
    requires: frozenset[str]
    doc: str

    @property
    def feature(self) -> str:
        return self.id.split(".", 1)[0]

    def missing_capabilities(self, capabilities: frozenset[str]) -> list[str]:
        return sorted(self.requires - capabilities)


CHECKS: dict[str, Check] = {}


def check(check_id: str, *, requires: tuple[str, ...] = ()) -> Callable[[CheckFn], CheckFn]:
    """Register ``fn`` as conformance check ``check_id``."""
    feature = check_id.split(".", 1)[0]
    assert feature in FEATURES and "." in check_id, check_id
    assert check_id not in CHECKS, f"duplicate check id {check_id}"

    def register(fn: CheckFn) -> CheckFn:
        doc = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())  # first paragraph
        CHECKS[check_id] = Check(check_id, fn, frozenset(requires), doc)
        return fn

    return register


def all_checks() -> list[Check]:
    """Every registered check, in id order (imports the check modules on first use)."""
    from mx_sim.conformance import checks  # noqa: F401  (registers on import)

    return [CHECKS[k] for k in sorted(CHECKS)]


def declared_families(adapter) -> list[str]:
    """The model families the adapter declares (``adapter.families``); ``AssertionError``
    for an empty declaration or a family the suite has no tiny model of."""
    from mx_sim.fixtures import MODEL_BUILDERS

    families = list(adapter.families)
    unknown = [k for k in families if k not in MODEL_BUILDERS]
    if not families or unknown:
        raise AssertionError(
            f"adapter families {families}: declare one or more of {', '.join(MODEL_BUILDERS)}"
        )
    return families
