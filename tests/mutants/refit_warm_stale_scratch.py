"""Warm-cycle stale buffer: destination tensors filled through scratch (strided row-parallel
slices) are cached after the cycle that allocated them and consumed as-is on the next cycle,
without copying the new bytes out of scratch, so warm cycles apply the previous version's
rows (Dynamo PR #10901 review, bug 1: a buffer allocated this cycle but routed to
the scratch path stayed in the cached ``plan_dests``)."""

from __future__ import annotations

from mx_reference.refit.receiver import RefitReceiver
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class StaleScratchReceiver(RefitReceiver):
    def assemble(self, plan, buffers):
        scratch = buffers.scratch
        if scratch is not None and getattr(scratch, "assembled", False):
            return {name: buffers.dest.views[name] for name in plan.tensors}  # the bug
        if scratch is not None:
            scratch.assembled = True
        return super().assemble(plan, buffers)


class StaleScratchAdapter(ReferenceAdapter):
    receiver_class = StaleScratchReceiver


def factory() -> StaleScratchAdapter:
    return StaleScratchAdapter(CpuMockBackend())
