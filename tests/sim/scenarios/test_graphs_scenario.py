"""The graphs scenario (tiny HF Llama across a refit) and the graphs benchmark, quick mode."""

from __future__ import annotations

from mx_sim.bench import graphs as graphs_bench
from mx_sim.scenarios import graphs as graphs_scenario


def test_scenario_capture_refit_and_rebind_detection(tmp_path):
    rows = graphs_scenario.run(tmp_path, quick=True)
    assert [r.name for r in rows] == [
        "graphs/capture-replay",
        "graphs/inplace-refit",
        "graphs/rebind-refit-detected",
    ]
    assert all(r.passed for r in rows), [r.detail for r in rows]
    assert "validation detected; mode off: illegal access" in rows[2].detail
    assert rows[0].details["ops"] > 100


def test_bench_quick_reports_metrics_and_goals(tmp_path):
    results = graphs_bench.run(tmp_path, quick=True)
    assert [r.name for r in results] == ["graphs/ledger_diff", "graphs/replay_modes"]
    ledger, modes = results
    assert ledger.metrics["tensors"] == 200 and ledger.metrics["per_tensor_us"] > 0
    assert set(modes.metrics) >= {"bare_replay_ms", "off_overhead_pct", "always_overhead_pct"}
    assert all(r.goals for r in results)
