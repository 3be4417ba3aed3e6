"""On a GPU: the reference adapter on CUDA passes the discovery, IPC and graph checks (the refit
checks' simulated trainers serve CPU memory only; tests/reference/refit/test_cuda_refit.py
refits CUDA models over NIXL VRAM instead). On an H200 this found the postprocess undoing a
CUDA capture's in-place write that never ran (docs/graphs.md)."""

from __future__ import annotations

import pytest

from mx_sim.conformance.adapters import cuda_reference_adapter
from mx_sim.conformance.catalog import all_checks

CHECKS = [c for c in all_checks() if c.feature in ("discovery", "ipc", "graphs")]


@pytest.mark.gpu
@pytest.mark.parametrize("check", CHECKS, ids=[c.id for c in CHECKS])
def test_the_cuda_reference_adapter_passes(check):
    adapter = cuda_reference_adapter()  # a fresh engine per check, as the suite runs them
    missing = check.missing_capabilities(frozenset(adapter.capabilities))
    if missing:
        pytest.skip(f"needs {missing}")
    assert check.fn(adapter) is None  # a check raises when the adapter breaks its contract
