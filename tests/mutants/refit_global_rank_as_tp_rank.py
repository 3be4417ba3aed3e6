"""The global rank stands in for the TP rank: ``tp_rank = global_rank % tp_size`` is right only
when TP ranks are numbered fastest from global rank 0; under pipeline parallelism with another
rank order or offset (a controller rank, PP-fastest numbering) each rank pulls another rank's
slice (Dynamo PR #10901 review: ``torch.distributed.get_rank()`` as ``tp_rank``;
verl #7080 has the group-relative variant)."""

from __future__ import annotations

from mx_reference.refit.planner import TargetLayout
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class GlobalRankAdapter(ReferenceAdapter):
    def target_layout(self, *, tp_size, tp_rank, pp_size, pp_rank, global_rank):
        return TargetLayout.from_global_rank(global_rank, tp_size=tp_size)  # the bug


def factory() -> GlobalRankAdapter:
    return GlobalRankAdapter(CpuMockBackend())
