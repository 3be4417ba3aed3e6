"""Shared test configuration: hypothesis profiles, backends under test, the gpu gate."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from mx_reference.backends import CudaBackend
from mx_sim.cpu_mock import CpuMockBackend

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile(
    "ci",
    max_examples=50,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("stress", max_examples=2000, deadline=None)
settings.load_profile(
    os.environ.get("MX_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run tox -e gpu on a GPU runner)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu-mock", "cuda-default"])
def backend_case(request):
    """Both ways every discovery rule is tested.

    Yields ``(backend, tensors_are_accel)``: under the CPU mock the CPU tensors the tests build
    are accelerator tensors and must be found; under the default CUDA backend they must be
    ignored.
    """
    if request.param == "cpu-mock":
        return CpuMockBackend(), True
    return CudaBackend(), False


@pytest.fixture
def mock_backend() -> CpuMockBackend:
    return CpuMockBackend()


MUTANT_TEST = "sim/conformance/test_mutants.py::test_mutant_is_caught["


def pytest_terminal_summary(terminalreporter):
    """The mutants' score: one line, counted on the controller (also under xdist)."""
    reports = [
        r
        for status in ("passed", "failed")
        for r in terminalreporter.stats.get(status, [])
        if r.when == "call" and MUTANT_TEST in r.nodeid
    ]
    if reports:
        caught = sum(r.passed for r in reports)
        terminalreporter.write_line(f"conformance: {caught}/{len(reports)} mutants caught")
