"""Smoke test of benchmark 1: the quick run completes and reports every metric and its goal."""

from __future__ import annotations

import pytest

from mx_reference.transport.nixl import nixl_available
from mx_sim.bench import transport


@pytest.mark.multiprocess
@pytest.mark.xdist_group("transport")
@pytest.mark.timeout(60)
def test_quick_bench_reports_ratios(tmp_path):
    result, *idle = transport.run(tmp_path, quick=True)
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
    if nixl_available():  # and the idle CPU of a serving agent per progress mode
        (idle_cpu,) = idle
        cpu = idle_cpu.metrics
        assert idle_cpu.name == "transport_idle_cpu" and "poll_cpu_per_s" in idle_cpu.goals
        assert cpu["none_cpu_per_s"] < cpu["poll_cpu_per_s"] < cpu["thread_cpu_per_s"]
