"""The peer benchmark: a tiny run verifies every method and writes its JSON, plot and page
section; a failed repetition keeps its method out of the timings; a partial ``mx-sim bench``
keeps the other benchmarks' rows."""

from __future__ import annotations

import json

import pytest

from mx_reference.transport.nixl import nixl_available
from mx_sim.bench import peers
from mx_sim.commands import _earlier_results
from mx_sim.report import BenchResult

TINY = peers.PeersConfig(sizes_mib=(4,), reps=1, timeout_s=45.0)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("transport")
@pytest.mark.timeout(60)
def test_quick_run_verifies_every_method(tmp_path):
    (result,) = peers.run(tmp_path, quick=True, config=TINY)
    rows = json.loads((tmp_path / "peers.json").read_text())["sizes"][0]["rows"]
    want = [c.label for c in TINY.cases() if nixl_available() or "nixl" not in c.method]
    assert [r["case"] for r in rows] == want
    assert [r["case"] for r in rows if not r["verified"]] == [], [r.get("error") for r in rows]
    by_case = {r["case"]: r for r in rows}
    assert by_case["copy"]["x_copy"] == 1.0
    assert by_case["copy"]["rss_peak_trainer_x"] is None  # copy_ runs in one process
    for r in rows:
        assert r["seconds"] > 0 and r["rss_peak_receiver_x"] > 0
        # every Llama tensor; a vLLM-shaped rank holds q/k/v and gate/up fused
        per_layer = 6 if r["inference_tp"] > 1 else 9
        assert r["tensors"] == 3 + per_layer * peers.model_spec(4).num_layers
    assert by_case["refit_sim"]["phases"]["publish"] > 0
    assert result.metrics["copy_x_copy"] == 1.0
    assert (tmp_path / "peers.png").stat().st_size > 0
    section = peers.page_section(tmp_path, tmp_path / "performance.md")
    assert "## Weight-sync peers" in section and "![peers](./peers.png)" in section
    assert "| FAILED" not in section
    if nixl_available():  # each unmet goal against its phases, the mixed layout's included
        assert "What bounds the unmet ones here" in section and "TP2->TP1 (" in section


def test_a_failed_repetition_is_reported_not_timed():
    ok = {"seconds": 1.0, "phases": {}, "rss_base_mb": 1.0, "model_bytes": 8, "tensors": 1}
    ok.update(dict.fromkeys(peers.RSS_KEYS, 1.0))
    row = peers.summarize(peers.Case("bcast_tensor"), [ok, {"error": "not verified: w"}])
    assert row["verified"] is False and row["error"] == "not verified: w"
    assert "seconds" not in row
    assert peers.summarize(peers.Case("bcast_tensor"), [ok, ok])["seconds"] == 1.0


def test_a_partial_bench_run_keeps_the_other_benchmarks_rows(tmp_path):
    path = tmp_path / "results.json"
    old = [
        {"module": "transport", **BenchResult("transport_pull_nixl", {"a": 1.0}).to_json()},
        {"module": "peers", **BenchResult("peers 32 MiB", {"b": 2.0}).to_json()},
        BenchResult("refit warm vs cold cycle", {"c": 3.0}).to_json(),  # before modules were named
        BenchResult("graphs/ledger_diff", {"d": 4.0}).to_json(),
    ]
    path.write_text(json.dumps(old))
    kept = _earlier_results(path, ["peers"], {"graphs/ledger_diff"})
    assert [(m, r.name) for m, r in kept] == [
        ("transport", "transport_pull_nixl"),
        ("", "refit warm vs cold cycle"),
    ]
