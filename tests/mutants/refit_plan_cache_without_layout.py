"""The receiver's plan cache is keyed by the model and the target only, not by the sources'
layout, so after the trainer restarts at another TP every later cycle reuses a plan made for
the old shards (issue 16: passed all 27 checks; the reference keys plans by every source's
layout signature)."""

from __future__ import annotations

from mx_reference.refit.planner import PlanCache
from mx_reference.refit.receiver import RefitReceiver
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class LayoutBlindPlanCache(PlanCache):
    @staticmethod
    def key(manifests, target, model_config):
        return (model_config.key() if model_config else None, target)  # the bug: no layouts


class LayoutBlindReceiver(RefitReceiver):
    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.plans = LayoutBlindPlanCache(expected=self.plans.expected)


class LayoutBlindAdapter(ReferenceAdapter):
    receiver_class = LayoutBlindReceiver


def factory() -> LayoutBlindAdapter:
    return LayoutBlindAdapter(CpuMockBackend())
