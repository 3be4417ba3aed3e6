"""Each rank of an inference replica applies as soon as its own pull succeeded, without asking
the other ranks: when one rank's read fails, the others apply the new version and the replica
serves a model of mixed versions (issue 16: faults inside a multi-rank replica; the reference
votes over the replica's group before anything is applied)."""

from __future__ import annotations

from mx_reference.refit.receiver import RefitError, RefitReceiver
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class SoloReceiver(RefitReceiver):
    def _vote(self, version, failure):
        if failure is not None:  # the bug: only this rank's own outcome counts
            raise RefitError(f"v{version}: {failure}") from failure


class SoloAdapter(ReferenceAdapter):
    receiver_class = SoloReceiver


def factory() -> SoloAdapter:
    return SoloAdapter(CpuMockBackend())
