"""The multi-process simulator: the CI refit matrix, fan-out, faults, torchrun across node groups."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from mx_sim.models import TinyModelSpec
from mx_sim.refit_sim import FaultSpec, run_topology
from mx_sim.topology import TopologySpec

pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("refit-sim")]

TIED = TinyModelSpec(tie_word_embeddings=True)
MATRIX = {
    "TP1->TP1": (TopologySpec(), "llama", None),
    "TP2->TP1": (TopologySpec(trainer_tp=2), "llama", None),
    "TP1->TP2": (TopologySpec(inference_tp=2), "qwen2", None),
    "TP2->TP4-gqa": (TopologySpec(trainer_tp=2, inference_tp=4), "llama", None),
    "PP2xTP2->TP4": (TopologySpec(trainer_tp=2, trainer_pp=2, inference_tp=4), "llama", None),
    "EP2->EP1-moe": (TopologySpec(trainer_ep=2), "mixtral", None),
    "TP2->TP1-tied": (TopologySpec(trainer_tp=2), "llama", TIED),
}


def _receivers(result):
    return [r for r in result.ranks if r["role"] == "receiver"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(MATRIX))
def test_ci_matrix_three_cycles_bit_exact(name):
    spec, kind, model_spec = MATRIX[name]
    result = run_topology(spec, kind, cycles=3, model_spec=model_spec, deadline_s=100)
    assert result.passed, result.errors
    for rx in _receivers(result):
        cold, *warm = rx["cycles"]
        assert [c["version"] for c in rx["cycles"]] == [1, 2, 3]
        assert cold["registrations"] >= 1
        assert all(c["registrations"] == 0 and c["bytes_allocated"] == 0 for c in warm)
    assert result.bytes_moved > 0


@pytest.mark.timeout(120)
def test_fanout_tree_one_trainer_one_replica_two_receivers():
    result = run_topology(TopologySpec(replicas=3), "llama", cycles=3, fanout=True, deadline_s=100)
    assert result.passed, result.errors
    roles = [[c["source_role"] for c in rx["cycles"]] for rx in _receivers(result)]
    assert roles == [["trainer"] * 3, ["replica"] * 3, ["replica"] * 3]


FAULT_ERRORS = {
    "publisher_killed": "RemoteGone",
    "receiver_killed": "",
    "slow_rank": "",
    "corrupt_shard": "digest mismatch",
    "stale_version": "StaleVersion",
    "store_gone": "",
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", list(FAULT_ERRORS))
def test_faults_end_with_clear_errors_and_untouched_models(kind):
    # TP2->TP2: receivers sit at global ranks 2 and 3 with TP ranks 0 and 1
    spec = TopologySpec(trainer_tp=2, inference_tp=2)
    rank = {"receiver_killed": 3, "slow_rank": 1}.get(kind, 0)
    fault = FaultSpec(kind, cycle=2, rank=rank, delay_s=6.0)
    result = run_topology(spec, "llama", cycles=3, faults=fault, timeout_s=3.0, deadline_s=60)
    assert result.passed, result.errors
    assert result.seconds < 60
    for r in result.ranks:
        if r["rank"] == rank and kind.endswith("_killed"):
            assert r["status"] == "died"
            continue
        assert r["status"] == "ok" and r["error"], r  # every other rank: a clear error
    for rx in _receivers(result):
        if "failed_cycle" in rx:
            assert rx["failed_cycle"] == 2 and rx["digest_unchanged"] is True
            assert [c["version"] for c in rx["cycles"]] == [1]
    if FAULT_ERRORS[kind]:
        assert any(FAULT_ERRORS[kind] in e for e in result.errors), result.errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(150)
def test_torchrun_two_node_groups_on_loopback(tmp_path):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    try:
        for node in (0, 1):
            cmd = [
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(port),
                "-m", "mx_sim.refit_sim", "--model", "llama", "--trainer-tp", "2",
                "--inference-tp", "2", "--cycles", "3", "--timeout", "30",
                "--out", str(tmp_path),
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            )
        outputs = [p.communicate(timeout=130)[0].decode(errors="replace") for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["role"] for r in ranks] == ["trainer", "trainer", "receiver", "receiver"]
    for r in ranks[2:]:
        assert not r.get("error") and not r["failures"]
        assert [c["version"] for c in r["cycles"]] == [1, 2, 3]


@pytest.mark.timeout(120)
def test_scenario_quick_rows_pass(tmp_path):
    from mx_sim.scenarios.refit import run

    rows = run(tmp_path, quick=True)
    assert len(rows) == 3 and all(r.passed for r in rows), [r.detail for r in rows]
    assert all(r.timings["register"] == 0.0 and r.bytes_moved > 0 for r in rows)
