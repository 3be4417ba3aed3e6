"""The multi-process simulator: the CI refit matrix, every fault, torchrun across node groups."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from mx_sim import cli
from mx_sim.refit.faults import FAULTS, Fault
from mx_sim.refit.matrix import FAULT_TOPOLOGY, MATRIX
from mx_sim.refit.megatron_trainer import FAMILIES as MEGATRON_FAMILIES
from mx_sim.refit.megatron_trainer import megatron_available
from mx_sim.refit.multiprocess import default_engine, default_trainer, run_topology
from mx_sim.scenarios.refit import to_scenario

pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("refit-sim")]


def _receivers(result):
    return [r for r in result.ranks if r["role"] == "receiver"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(MATRIX))
def test_ci_matrix_three_cycles_bit_exact(name):
    row = MATRIX[name]
    trainer = default_trainer(row.spec, row.kind)
    megatron = megatron_available() and row.kind in MEGATRON_FAMILIES
    assert trainer == ("megatron" if megatron else "hf-split")
    result = run_topology(
        row.spec,
        row.kind,
        cycles=3,
        model_spec=row.model_spec,
        fanout=row.fanout,
        trainer=trainer,
        deadline_s=100,
    )
    assert result.passed, result.errors
    scenario = to_scenario(name, result)
    assert scenario.passed and scenario.detail.endswith(", warm cycles 0 registrations")
    engine = default_engine(row.spec, row.kind, row.fanout)
    assert engine == ("hf-tp" if row.spec.inference_tp > 1 and not row.fanout else "full")
    assert result.engine == engine
    if trainer == "megatron" or engine == "hf-tp":  # a TP forward: within the stated 1e-5
        assert result.logits_max_abs() <= 1e-5, result.logits_max_abs()
    else:
        assert result.logits_max_abs() == 0.0
    for rx in _receivers(result):
        if engine == "hf-tp":  # each rank pulled exactly the bytes of its own shards, and
            # holds nothing else: its storages are compacted to the shard bytes
            assert all(c["bytes_pulled"] == rx["local_bytes"] for c in rx["cycles"]), rx
            assert rx["storage_bytes"] == rx["local_bytes"], rx
        cold, *warm = rx["cycles"]
        assert [c["version"] for c in rx["cycles"]] == [1, 2, 3]
        assert cold["registrations"] >= 1
        assert all(c["registrations"] == 0 and c["bytes_allocated"] == 0 for c in warm)
    assert result.bytes_moved > 0
    if engine == "hf-tp":  # the replica pulls every byte, and less than T copies of the model
        ratio = result.pulled_over_model()
        assert 1.0 <= ratio < row.spec.inference_tp, ratio
        if row.kind in ("llama", "qwen2", "qwen3"):  # everything sharded but norms and KV
            assert ratio <= 1.2, ratio
    if row.fanout:  # replica 0 pulls from the trainers, the others from replica 0
        kinds = [[c["source_kind"] for c in rx["cycles"]] for rx in _receivers(result)]
        assert kinds == [["trainer"] * 3, ["replica"] * 3, ["replica"] * 3]


def _struck_rank(kind: str) -> int:
    return 0 if FAULTS[kind].side == "trainer" else FAULT_TOPOLOGY.world_size - 1


@pytest.mark.reliability
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", list(FAULTS))
def test_faults_end_with_clear_errors_and_untouched_models(kind):
    rank = 1 if kind == "slow_rank" else _struck_rank(kind)
    fault = Fault(kind, cycle=2, rank=rank, delay_s=6.0)
    result = run_topology(
        FAULT_TOPOLOGY, "llama", 3, fault=fault, engine="full", timeout_s=3.0, deadline_s=60
    )
    assert result.passed, result.errors
    assert result.seconds < 60
    entry = FAULTS[kind]
    for r in result.ranks:
        if r["rank"] == rank and entry.kills:
            assert r["status"] == "died"
            continue
        assert r["status"] == "ok" and r["error"], r  # every other rank: a clear error
    for rx in _receivers(result):
        if "failed_cycle" in rx:
            assert rx["failed_cycle"] == 2 and rx["digest_unchanged"] is True
            assert [c["version"] for c in rx["cycles"]] == [1]
    if entry.error:
        assert any(entry.error in e for e in result.errors), result.errors
    assert len(result.rank_lines()) == FAULT_TOPOLOGY.world_size


@pytest.mark.timeout(90)
def test_sharded_ranks_refuse_a_corrupted_shard_on_every_rank_and_keep_their_shards():
    fault = Fault("corrupt_shard", cycle=1, rank=0)  # its first served read: cycle 1
    result = run_topology(
        FAULT_TOPOLOGY, "llama", 3, fault=fault, engine="hf-tp", timeout_s=15.0, deadline_s=80
    )
    assert result.passed, result.errors
    for rx in _receivers(result):  # the all-reduced checksum fails every rank alike
        assert "content checksum mismatch" in rx["error"], rx["error"]
        assert rx["failed_cycle"] == 1 and rx["digest_unchanged"] is True


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("kind", "says"), [("corrupt_shard", "digest mismatch"), ("receiver_killed", "died")]
)
def test_cli_runs_a_fault_and_reports_one_line_per_rank(kind, says, tmp_path):
    out = tmp_path / "out"
    argv = ["run", "--scenarios", "refit", "--fault", kind, "--out", str(out)]
    assert cli.main(argv) == 0
    (row,) = json.loads((out / "report.json").read_text())["scenarios"]
    assert row["name"] == f"refit TP2->TP2 fault {kind}" and row["passed"], row
    assert row["detail"].startswith("contained: ")
    lines = row["details"]["ranks"]
    assert [line.split(" (")[0] for line in lines] == [f"rank {r}" for r in range(4)]
    assert all("\n" not in line for line in lines) and any(says in line for line in lines)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("receiver_killed:2:0", "strikes a receiver rank; rank 0 of TP2->TP2 is a trainer"),
        ("publisher_killed:2:9", "rank 9 of TP2->TP2 is outside its ranks"),
        ("corrupt_shard:x", "expected KIND[:cycle[:rank]]"),
    ],
)
def test_bad_fault_is_one_line_before_any_spawn(fault, message, capsys):
    rc = cli.main(["run", "--scenarios", "refit", "--fault", fault, "--out", "unused"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.reliability
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
                "-m", "mx_sim.refit.torchrun", "--model", "llama", "--trainer-tp", "2",
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


@pytest.mark.timeout(120)
@pytest.mark.skipif(not megatron_available(), reason="megatron-core not installed")
def test_cli_megatron_trainer_tp2_to_tp1_three_cycles(tmp_path):
    out = tmp_path / "out"
    argv = ["run", "--scenarios", "refit", "--trainer", "megatron", "--out", str(out)]
    assert cli.main([*argv, "--trainer-tp", "2", "--inference-tp", "1", "--cycles", "3"]) == 0
    (row,) = json.loads((out / "report.json").read_text())["scenarios"]
    assert row["passed"] and row["detail"].startswith("logits within 1e-05 of Megatron-Core's")
    assert [len(cs) for cs in row["details"]["receivers"]] == [3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trainer", "megatron", "--trainer-tp", "4"], "Megatron-Core refuses TP4 x PP1: "
         "num_query_groups (2) must be a multiple of tensor_model_parallel_size (4)"),
        (["--trainer", "megatron", "--trainer-tp", "3"], "Megatron-Core refuses TP3 x PP1: "
         "num_attention_heads (4) must be a multiple of tensor_model_parallel_size (3)"),
        (["--trainer", "megatron", "--trainer-pp", "3"], "num_layers (2) must be a multiple of "
         "pipeline_model_parallel_size (3)"),
        (["--trainer", "megatron", "--model", "gemma"], "model 'gemma' does not run "
         "through Megatron-Core here"),
        (["--trainer", "megatron", "--model", "mixtral", "--trainer-ep", "3"],
         "num_experts=4 not divisible by ep_size=3"),
    ],
)  # fmt: skip
def test_a_topology_megatron_refuses_is_one_line_before_any_spawn(argv, message, capsys):
    if not megatron_available():
        pytest.skip("megatron-core not installed")
    rc = cli.main(["run", "--scenarios", "refit", "--out", "unused", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_without_megatron_the_run_says_it_falls_back_in_one_line(tmp_path, monkeypatch, capsys):
    from mx_sim.scenarios import refit

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # the line is printed before the first row runs

    monkeypatch.setattr(refit, "megatron_available", lambda: False)
    monkeypatch.setattr(refit, "run_topology", stop)
    with pytest.raises(Stop):
        refit.run(tmp_path, quick=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if "megatron" in line]
    assert lines == ["[mx-sim] megatron-core is not installed: refit rows use the HF-split trainer"]


@pytest.mark.timeout(120)
def test_cli_model_sizes_let_an_eight_rank_llama_trainer_run(tmp_path):
    # 4 heads in 2 groups cannot be split 4 ways; 8 heads in 4 groups can
    out = tmp_path / "out"
    argv = ["run", "--scenarios", "refit", "--out", str(out), "--cycles", "2"]
    argv += ["--trainer-tp", "4", "--trainer-pp", "2", "--inference-tp", "2"]
    argv += ["--num-heads", "8", "--num-kv-heads", "4", "--vocab-size", "200", "--num-layers", "2"]
    assert cli.main(argv) == 0
    (row,) = json.loads((out / "report.json").read_text())["scenarios"]
    assert row["name"] == "refit PP2xTP4->TP2 llama" and row["passed"], row


@pytest.mark.timeout(120)
def test_cli_bf16_row_is_sharded_and_within_the_bf16_tolerance(tmp_path):
    out = tmp_path / "out"
    argv = ["run", "--scenarios", "refit", "--model", "qwen3", "--dtype", "bfloat16"]
    assert cli.main([*argv, "--trainer-tp", "2", "--inference-tp", "2", "--out", str(out)]) == 0
    (row,) = json.loads((out / "report.json").read_text())["scenarios"]
    assert row["passed"] and "TP logits within 0.05" in row["detail"], row["detail"]
    # bf16: half the bytes of the fp32 rows of the same shapes
    assert row["bytes_moved"] == 3 * 2 * 78592, row["bytes_moved"]


def test_megatron_with_bf16_is_one_line_before_any_spawn(capsys):
    rc = cli.main(
        [
            "run",
            "--scenarios",
            "refit",
            "--trainer",
            "megatron",
            "--dtype",
            "bfloat16",
            "--out",
            "x",
        ]
    )
    err = capsys.readouterr().err
    if not megatron_available():
        pytest.skip("megatron-core not installed")
    assert rc == 2 and "runs float32 here" in err and err.count("\n") == 1, err
