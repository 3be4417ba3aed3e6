"""Refit conformance checks have teeth: the reference adapter passes all of them, an adapter
that declares nothing is skipped with reasons, and every refit mutant fails the check meant
for its bug class."""

from __future__ import annotations

from pathlib import Path

import pytest

from mx_reference import adapter as caps
from mx_sim.conformance.adapters import ReferenceAdapter, reference_adapter
from mx_sim.conformance.catalog import all_checks
from mx_sim.conformance.inputs import load_factory
from mx_sim.conformance.run_checks import run_checks
from mx_sim.cpu_mock import CpuMockBackend

# mutant module -> the check that must catch it (others may too)
MUTANTS = {
    "refit_last_rank_full_axis": "refit.mixed_tp_wider",
    "refit_warm_stale_scratch": "refit.warm_cycle_scratch",
    "refit_global_rank_as_tp_rank": "refit.pp_target_layout",
    "refit_ep_rank_from_global_rank": "refit.ep_target_layout",
    "refit_gated_mlp_half_split": "refit.mixed_tp_wider",
    "refit_qkv_concat": "refit.same_layout_bit_exact",
    "refit_tie_lost": "refit.tied_embeddings",
    "refit_rebind_storage": "refit.in_place_storage",
    "refit_partial_apply": "refit.mid_transfer_failure",
    "refit_load_weights_casts": "refit.load_weights_atomic",
    "refit_pause_not_gating": "refit.pause_gating",
    "refit_plan_cache_without_layout": "refit.trainer_layout_change",
    "refit_digest_not_verified": "refit.corruption_in_flight",
    "refit_vocab_padding_64": "refit.bf16_padded_vocab",
    "refit_replica_no_vote": "refit.replica_fault",
    "refit_newest_manifest_per_rank": "refit.partial_version",
}
REFIT_CHECKS = [c for c in all_checks() if c.feature == "refit"]


def test_reference_adapter_passes_every_refit_check():
    report = run_checks(reference_adapter, keyword="refit.")
    assert [r.id for r in report.results] == [c.id for c in REFIT_CHECKS]
    for r in report.results:  # a full-model engine has no shard to check
        want = "skipped" if r.id.startswith("refit.sharded_") else "passed"
        assert r.status == want, r
    assert all(c.doc for c in REFIT_CHECKS)  # the report's text


class _NoCapabilities(ReferenceAdapter):
    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset()


def test_undeclared_capabilities_skip_with_their_reason():
    report = run_checks(lambda: _NoCapabilities(CpuMockBackend()), keyword="refit.")
    status = {r.id: (r.status, r.reason) for r in report.results}
    for c in REFIT_CHECKS:
        if c.requires:
            assert status[c.id][0] == "skipped"
            assert all(cap in status[c.id][1] for cap in c.requires), status[c.id]
        else:
            assert status[c.id] == ("passed", "")
    gated = {cap for c in REFIT_CHECKS for cap in c.requires}
    assert gated == {
        caps.MIXED_TP,
        caps.PIPELINE_PARALLEL,
        caps.TIED_EMBEDDINGS,
        caps.MOE,
        caps.SHARDED,
    }


def test_every_refit_mutant_module_is_listed():
    on_disk = {p.stem for p in (Path(__file__).parents[2] / "mutants").glob("refit_*.py")}
    assert on_disk == set(MUTANTS)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_fails_its_refit_check(name):
    report = run_checks(load_factory(f"mutants.{name}:factory"), name=name, keyword="refit.")
    failed = report.failed_ids()
    reasons = {r.id: r.reason for r in report.results if r.id in failed}
    assert MUTANTS[name] in failed, f"{name} caught by {failed or 'no check'}: {reasons}"


def test_hf_tp_adapter_refuses_a_rank_without_its_replica_as_process_group():
    from mx_sim.conformance.hf_tp_adapter import hf_tp_adapter

    with pytest.raises(ValueError, match=r"tp_size=2, tp_rank=1.*default group, which is None"):
        hf_tp_adapter().build_sharded("llama", tp_size=2, tp_rank=1)


def test_replica_ranks_as_processes_need_a_tcp_store():
    from mx_sim.refit.rig import RefitRig, RigConfig, replica_ranks

    with RefitRig(RigConfig()) as rig, pytest.raises(ValueError, match="tcp_store=True"):
        replica_ranks(rig, 2, print, processes=True)
