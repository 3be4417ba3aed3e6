"""Discovery, IPC and graph conformance checks: the reference passes them all, each of this
area's mutants fails the checks written for its bug, and the IPC byte oracle is bit-exact."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mx_reference import adapter as caps
from mx_reference.ipc import Decoder, Encoder
from mx_sim.conformance.adapters import ReferenceAdapter, reference_adapter
from mx_sim.conformance.catalog import all_checks
from mx_sim.conformance.checks import ipc
from mx_sim.conformance.run_checks import run_checks
from mx_sim.cpu_mock import CpuMockBackend

FEATURES = ("discovery", "ipc", "graphs")

# mutant module -> (its feature, the checks written to catch it)
MUTANTS = {
    "discovery_start_pointer_dedup": ("discovery", {"discovery.hard_cases"}),
    "discovery_ignores_backend": ("discovery", {"discovery.backend_predicate"}),
    "discovery_tie_sent_twice": ("discovery", {"discovery.tied_once"}),
    "ipc_abort_string_iterated": ("ipc", {"ipc.abort_request_ids"}),
    "graphs_capture_without_postprocess": ("graphs", {"graphs.postprocess_restores_inputs"}),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_reference_adapter_passes_every_check(feature):
    report = run_checks(reference_adapter, keyword=f"{feature}.")
    assert len(report.results) >= 4
    statuses = {r.id: (r.status, r.reason) for r in report.results}
    assert all(status == "passed" for status, _ in statuses.values()), statuses


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_fails_the_checks_for_its_bug(name):
    feature, expected = MUTANTS[name]
    module = importlib.import_module(f"mutants.{name}")
    assert module.__doc__ and isinstance(module.factory(), ReferenceAdapter)
    report = run_checks(module.factory, name=name, keyword=f"{feature}.")
    caught_by = set(report.failed_ids())
    assert expected <= caught_by, (name, caught_by)
    # The failure message says what the adapter did wrong, not just that something failed.
    assert all(r.reason for r in report.results if r.id in caught_by)


class NoSharedIpcAdapter(ReferenceAdapter):
    @property
    def capabilities(self) -> frozenset[str]:
        return caps.CAPABILITIES - {caps.SHARED_IPC}


def test_undeclared_capability_skips_with_reason():
    report = run_checks(lambda: NoSharedIpcAdapter(CpuMockBackend()), keyword="ipc.")
    skipped = {r.id: r.reason for r in report.results if r.status == "skipped"}
    gated = {c.id for c in all_checks() if caps.SHARED_IPC in c.requires}
    assert set(skipped) == gated and len(gated) >= 4
    assert set(skipped.values()) == {"adapter does not declare capability shared_ipc"}
    assert report.ok  # the ungated IPC checks still ran and passed


def test_every_check_of_this_area_has_a_one_line_doc():
    checks = [c for c in all_checks() if c.feature in FEATURES]
    assert len(checks) >= 16
    assert all(c.doc and c.doc.endswith(".") for c in checks), [c.id for c in checks if not c.doc]


@given(
    st.sampled_from(ipc.DTYPES),
    st.lists(st.integers(0, 5), max_size=3).map(tuple),
    st.integers(0, 2**16),
    st.data(),
)
def test_ipc_oracle_accepts_round_trips_and_sees_any_flipped_byte(dtype, shape, seed, data):
    sent = {"outer": [ipc._random(dtype, shape, seed)]}
    got = Decoder().decode(Encoder().encode(sent))
    assert ipc._diff(sent, got, "m") is None
    raw = ipc._raw(got["outer"][0])
    if raw.numel():
        i = data.draw(st.integers(0, raw.numel() - 1))
        flipped = raw.clone()
        flipped[i] ^= 0x01
        got["outer"][0] = flipped.view(dtype).reshape(shape)
        assert ipc._diff(sent, got, "m") == f"m.outer[0]: {dtype} {shape} bytes differ"


def test_ipc_oracle_sees_bf16_sent_as_float32_and_tuples_reshaped():
    t = torch.tensor([1.0, -0.0], dtype=torch.bfloat16)
    assert "torch.bfloat16" in ipc._diff(t, t.float(), "m")
    assert ipc._diff((1, [t]), [1, [t]], "m") is None
    assert ipc._diff((1, 2), [1], "m") == "m: a sequence of 2 came back as [1]"
