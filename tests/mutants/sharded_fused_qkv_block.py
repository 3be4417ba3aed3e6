"""A sharded loader that cuts the fused ``q|k|v`` weight as one block (rank r takes rows
``[r n / T, (r + 1) n / T)`` of ``cat(q, k, v)``) instead of per projection: at TP 2 rank 0
holds every q head and rank 1 only k and v (vLLM's ``QKVParallelLinear`` shards each part)."""

from __future__ import annotations

from mx_reference.refit.shards import SlicePart
from mx_sim.conformance.sharded_adapter import VllmShapedAdapter
from mx_sim.cpu_mock import CpuMockBackend


class FusedQkvAsOneBlock(VllmShapedAdapter):
    def loader_layout(self, engine):
        layout = {}
        for name, parts in engine.layout.items():
            if ".qkv_proj." in name:
                sizes = [engine.meta[p.hf_name].shape[0] for p in parts]
                local = sum(p.stop - p.start for p in parts)
                lo = engine.tp_rank * local  # the bug: one block of cat(q, k, v)
                cut, at = [], 0
                for p, n in zip(parts, sizes, strict=True):
                    a, b = max(lo, at), min(lo + local, at + n)
                    if a < b:
                        cut.append(SlicePart(p.hf_name, 0, a - at, b - at))
                    at += n
                parts = tuple(cut)
            layout[name] = parts
        return layout


def factory() -> FusedQkvAsOneBlock:
    return FusedQkvAsOneBlock(CpuMockBackend())
