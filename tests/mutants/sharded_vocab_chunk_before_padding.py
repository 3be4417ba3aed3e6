"""A sharded loader that splits the vocab evenly before padding it (``torch.chunk`` of the
real rows, the padding after each rank's share), where vLLM's ``VocabParallelEmbedding`` pads
the vocab to a multiple of 64 first and then splits: at vocab 300 and TP 2 rank 0 writes rows
[0, 150) where it holds [0, 160), and rank 1 starts 10 rows early."""

from __future__ import annotations

from mx_reference.refit.shards import Padding, SlicePart, chunk_range
from mx_sim.conformance.sharded_adapter import VllmShapedAdapter
from mx_sim.cpu_mock import CpuMockBackend


class VocabChunkBeforePadding(VllmShapedAdapter):
    def loader_layout(self, engine):
        layout = dict(engine.layout)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in layout:
                lo, hi = chunk_range(engine.meta[name].shape[0], engine.tp_size, engine.tp_rank)
                pad = engine.local[name].shape[0] - (hi - lo)  # the bug: chunked, then padded
                layout[name] = (SlicePart(name, 0, lo, hi),) + ((Padding(0, pad),) if pad else ())
        return layout


def factory() -> VocabChunkBeforePadding:
    return VocabChunkBeforePadding(CpuMockBackend())
