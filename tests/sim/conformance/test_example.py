"""The worked example of docs/conformance.md passes the suite, skipping only what it does not
declare; with the storage-rebinding loader the walk-through shows, the suite catches it."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from mx_reference import adapter as caps
from mx_sim.conformance.catalog import all_checks
from mx_sim.conformance.run_checks import run_checks

EXAMPLE = pathlib.Path(__file__).parents[3] / "docs" / "examples" / "toy_engine_adapter.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("toy_engine_adapter", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_adapter_passes_and_skips_only_undeclared(toy):
    assert isinstance(toy.factory(), caps.EngineAdapter)
    report = run_checks(toy.factory)
    assert report.failed_ids() == []
    skipped = {r.id: r.reason for r in report.results if r.status == "skipped"}
    sharded = {c.id for c in all_checks() if caps.SHARDED in c.requires}
    assert set(skipped) == {
        "discovery.hf_mixtral",
        "discovery.post_load_capture",
        "refit.moe_expert_parallel",
        "refit.ep_target_layout",
        *sharded,
    }
    assert all(any(c in why for c in ("moe", "fp8", "sharded")) for why in skipped.values())


def test_walkthrough_bug_is_caught(toy, monkeypatch):
    def rebinding_loader(model, named_tensors):
        params = dict(model.named_parameters())
        for name, new in named_tensors:
            params[name].data = new.clone()

    monkeypatch.setattr(toy, "load_in_place", rebinding_loader)
    report = run_checks(toy.factory, keyword="refit")
    assert {"refit.in_place_storage", "refit.load_weights_atomic", "graphs.refit_in_place"} <= set(
        report.failed_ids()
    )
