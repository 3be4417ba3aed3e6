"""A sharded loader that cuts row-parallel weights (o_proj, down_proj) on dim 0 like the
column-parallel ones: a TP rank's columns become rows of the wrong input features
(shared/reference/engines.md, section 2: ``o_proj``/``down_proj`` are ``Shard(1)``)."""

from __future__ import annotations

from mx_reference.refit.shards import SlicePart, chunk_range
from mx_sim.conformance.sharded_adapter import VllmShapedAdapter
from mx_sim.cpu_mock import CpuMockBackend


class RowParallelOnDim0(VllmShapedAdapter):
    def loader_layout(self, engine):
        layout = dict(engine.layout)
        for name, parts in layout.items():
            if parts[0].dim == 1:  # the bug: the row-parallel split read on dim 0
                rows = engine.meta[name].shape[0]
                lo, hi = chunk_range(rows, engine.tp_size, engine.tp_rank)
                layout[name] = (SlicePart(name, 0, lo, hi),)
        return layout


def factory() -> RowParallelOnDim0:
    return RowParallelOnDim0(CpuMockBackend())
