"""The receiver skips the content check of what it pulled (digests are "only for debugging"),
so a byte flipped in flight is applied to the live model (issue 16: ``FaultPlan(corrupt_on=...)``
existed, but no check used it, and the skip passed all 27 checks)."""

from __future__ import annotations

from mx_reference.refit.receiver import RefitReceiver
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class TrustingReceiver(RefitReceiver):
    def verify(self, manifests, canonical, tensors):
        pass  # the bug: neither names nor digests are checked


class TrustingAdapter(ReferenceAdapter):
    receiver_class = TrustingReceiver


def factory() -> TrustingAdapter:
    return TrustingAdapter(CpuMockBackend())
