"""Smoke test of benchmark 1: the quick run completes and reports every metric and its goal."""

from __future__ import annotations

import pytest

from mx_reference.transport.nixl import nixl_available
from mx_sim.bench import transport


@pytest.mark.multiprocess
@pytest.mark.xdist_group("transport")
@pytest.mark.timeout(60)
def test_quick_bench_reports_ratios(tmp_path):
    (result,) = transport.run(tmp_path, quick=True)
    assert result.name == ("transport_pull_nixl" if nixl_available() else "transport_pull_sim")
    for style in ("one_desc", "prepped_300", "coalesced_300"):
        assert result.metrics[f"{style}_gbps"] > 0
        assert result.metrics[f"{style}_ratio"] == pytest.approx(
            result.metrics[f"{style}_gbps"] / result.metrics["copy_gbps"]
        )
    assert result.metrics["tensors"] == transport.TENSORS
    if nixl_available():
        assert "coalesced_300_ratio" in result.goals
        assert result.met == (result.metrics["coalesced_300_ratio"] >= transport.GOAL_RATIO)
