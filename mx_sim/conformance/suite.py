"""The conformance suite as pytest tests: one parametrized test per registered check.

Collected only when the plugin is given an adapter (``--mx-adapter``, ``MX_ADAPTER`` or an
in-process factory).
"""

from __future__ import annotations

import pytest

from mx_sim.conformance.catalog import all_checks
from mx_sim.conformance.plugin import adapter_factory

CHECKS = all_checks()


@pytest.fixture(scope="session")
def mx_adapter_factory(pytestconfig):
    return adapter_factory(pytestconfig)


@pytest.mark.parametrize(
    "check", [pytest.param(c, id=c.id, marks=pytest.mark.mx_check(c.id)) for c in CHECKS]
)
def test_check(check, mx_adapter_factory):
    adapter = mx_adapter_factory()
    missing = check.missing_capabilities(frozenset(adapter.capabilities))
    if missing:
        pytest.skip(f"adapter does not declare capability {', '.join(missing)}")
    check.fn(adapter)
