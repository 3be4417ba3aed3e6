"""The last TP rank's destination buffer is sized to the whole shard axis instead of its own
remainder ``extent - per_rank * (tp - 1)``: the rank pulls its rows into the front of a buffer
``tp`` times too large and the rest is read as data (Dynamo PR #10901 review, bug 2)."""

from __future__ import annotations

import dataclasses

from mx_reference.refit.planner import RefitPlan
from mx_reference.refit.receiver import RefitReceiver
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class LastRankFullAxisReceiver(RefitReceiver):
    def allocate(self, plan, manifests, timing):
        if self.target.tp_size > 1 and self.target.tp_rank == self.target.tp_size - 1:
            tensors = {}
            for name, t in plan.tensors.items():
                shape = list(t.dst_shape)
                shape[t.spec.shard_axis] = t.spec.global_shape[t.spec.shard_axis]  # the bug
                tensors[name] = dataclasses.replace(t, dst_shape=tuple(shape))
            plan = RefitPlan(plan.target, tensors)
        return super().allocate(plan, manifests, timing)


class LastRankFullAxisAdapter(ReferenceAdapter):
    receiver_class = LastRankFullAxisReceiver


def factory() -> LastRankFullAxisAdapter:
    return LastRankFullAxisAdapter(CpuMockBackend())
