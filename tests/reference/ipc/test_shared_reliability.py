"""The shared channel under dying peers, each case run as its scenario
(``mx_sim.scenarios.ipc_faults``) in a private ``/dev/shm`` where the machine allows, so the
counts there are the scenario's own. The figures asserted are the ones docs/reliability.md quotes.

``MX_SOAK_S`` sets how long the dead-consumer stream runs (2 s by default; 600 for the soak).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from mx_sim.isolation import run_isolated

SOAK_S = float(os.environ.get("MX_SOAK_S", "2"))

pytestmark = [pytest.mark.reliability, pytest.mark.multiprocess, pytest.mark.xdist_group("ipc")]


def run_case(case: str, *args: str, timeout_s: float) -> tuple[dict, bool]:
    argv = [sys.executable, "-m", "mx_sim.scenarios.ipc_faults", case, *args]
    done, isolated = run_isolated(argv, timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), isolated


@pytest.mark.timeout(150)
def test_a_dead_producer_fails_its_messages_at_once_and_starves_no_one():
    result, isolated = run_case("producer_death", timeout_s=120)
    figures = result["details"]
    assert result["passed"], (result["detail"], figures)
    assert figures["healthy_delivered"] == figures["healthy_expected"] == 300
    assert figures["dead_failed"] > 0 and figures["other_failures"] == 0
    assert figures["dead_delivered"] + figures["dead_failed"] == 40
    assert figures["detections"] == 1  # noticed once, not once per message
    # every in-flight message of the dead producer failed within a fraction of one timeout
    assert figures["time_to_error_s"] < 1.0 < figures["get_timeout_s"]
    assert figures["healthy_expired"] == figures["healthy_unacked"] == 0
    if isolated:
        assert figures["shm_entries_added"] == 0


@pytest.mark.timeout(SOAK_S + 240)
def test_a_producer_whose_consumer_died_keeps_its_fds_bounded():
    # a limit of 512 fds and a 0.25 s TTL: short on a loaded CI machine, and unfetched the
    # 512 messages streamed would hold about 1024 fds (each its storage's and the offered dup)
    args = ("--seconds", str(SOAK_S), "--nofile", "512", "--ttl", "0.25")
    result, isolated = run_case("dead_consumer", *args, timeout_s=SOAK_S + 200)
    figures = result["details"]
    assert result["passed"], (result["detail"], figures)
    assert figures["fd_limit"] == 512 and figures["messages"] >= figures["fd_limit"], figures
    assert figures["fds_max"] <= figures["fd_limit"] // 2, figures
    assert figures["expired"] > 0, figures
    if isolated:
        assert figures["shm_entries_added"] == 0
