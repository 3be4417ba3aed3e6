"""``mx-sim``: one-line errors for bad options, the main job's report files, exit codes."""

from __future__ import annotations

import json

import pytest

from mx_sim import cli
from mx_sim.report import ScenarioResult
from mx_sim.scenarios import discovery


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--trainer-tp", "0"], "--trainer-tp: expected a positive integer, got 0"),
        (["run", "--cycles", "x"], "--cycles: expected a positive integer, got 'x'"),
        (["run", "--scenarios", "bogus"], "unknown name(s) bogus"),
        (["run", "--transport", "rdma"], "--transport: invalid choice: 'rdma'"),
        (["bench", "--only", "nope"], "unknown name(s) nope"),
        (["frob"], "invalid choice: 'frob'"),
        (["conformance"], "the following arguments are required: --adapter"),
        (["conformance", "--adapter", "a:f", "--tb", "full"], "--tb: invalid choice: 'full'"),
    ],
)
def test_bad_options_get_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unplannable_topology_is_one_line_before_any_spawn(capsys):
    rc = cli.main(["run", "--scenarios", "refit", "--inference-tp", "3", "--out", "unused"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("mx-sim: error: topology TP1->TP3 cannot refit llama: tensor ")
    assert "num_kv_heads=2" in err and err.count("\n") == 1


def test_bad_adapter_spec_is_one_line(capsys):
    assert cli.main(["conformance", "--adapter", "no_such_module:factory"]) == 2
    err = capsys.readouterr().err
    assert "cannot import 'no_such_module'" in err and err.count("\n") == 1


def test_quick_run_writes_reports_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", "--quick", "--scenarios", "discovery,graphs", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| scenario | result | bytes moved |" in printed
    report = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in report["scenarios"]]
    assert report["failed"] == 0 and report["passed"] == len(names) > 0
    assert any(n.startswith("discovery/") for n in names)
    assert any(n.startswith("graphs/") for n in names)
    assert "scenarios passed" in (out / "report.md").read_text()
    assert (out / "scenario_seconds.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_scenario_fails_the_run(tmp_path, monkeypatch, capsys):
    def broken(out_dir, quick):
        return [ScenarioResult(name="discovery/broken", passed=False, detail="boom")]

    monkeypatch.setattr(discovery, "run", broken)
    out = tmp_path / "out"
    assert cli.main(["run", "--scenarios", "discovery", "--out", str(out)]) == 1
    assert "| discovery/broken | FAIL |" in (out / "report.md").read_text()
    assert "0/1 passed" in capsys.readouterr().out


@pytest.mark.multiprocess
@pytest.mark.xdist_group("refit-sim")
@pytest.mark.timeout(120)
def test_custom_topology_with_inference_pp(tmp_path, capsys):
    """TP2 trainers -> PP2 x TP2 receivers: tp_rank != global rank on every receiver."""
    out = tmp_path / "out"
    argv = ["run", "--scenarios", "refit", "--out", str(out), "--cycles", "2"]
    argv += ["--trainer-tp", "2", "--inference-tp", "2", "--inference-pp", "2"]
    assert cli.main(argv) == 0
    (row,) = json.loads((out / "report.json").read_text())["scenarios"]
    assert row["name"] == "refit TP2->PP2xTP2 llama" and row["passed"], row
    assert row["bytes_moved"] > 0
    assert (out / "refit_phases.png").exists()
