"""The EP position derived from the global rank: ``ep_rank = global_rank // tp_size`` holds
only when EP groups are numbered TP-fastest from global rank 0; after a controller rank, or
with EP-fastest numbering, a rank plans another rank's experts (vLLM computes it from
``dp_rank * tp_size + tp_rank``; the engine's own EP group rank is the one that places
experts)."""

from __future__ import annotations

from mx_reference.refit.planner import TargetLayout
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class GlobalRankEpAdapter(ReferenceAdapter):
    def target_layout(
        self, *, tp_size, tp_rank, pp_size, pp_rank, global_rank, ep_size=1, ep_rank=0
    ):
        derived = global_rank // tp_size % ep_size  # the bug
        return TargetLayout(tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=derived)


def factory() -> GlobalRankEpAdapter:
    return GlobalRankEpAdapter(CpuMockBackend())
