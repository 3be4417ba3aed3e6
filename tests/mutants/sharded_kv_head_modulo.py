"""A sharded loader that, with more TP ranks than KV heads, gives rank r KV head ``r % G``
instead of vLLM's ``r // (T / G)``: at T=4, G=2 ranks 1 and 2 attend with the other group's
keys and values (shared/reference/engines.md, section 2: fewer KV heads than ranks)."""

from __future__ import annotations

from mx_reference.refit.shards import SlicePart
from mx_sim.conformance.sharded_adapter import VllmShapedAdapter
from mx_sim.cpu_mock import CpuMockBackend


class KvHeadModulo(VllmShapedAdapter):
    def loader_layout(self, engine):
        config = engine.model.config
        groups = config.num_key_value_heads
        if engine.tp_size <= groups:
            return engine.layout
        head_dim = config.hidden_size // config.num_attention_heads
        head = engine.tp_rank % groups  # the bug
        kv = (head * head_dim, (head + 1) * head_dim)
        layout = {}
        for name, parts in engine.layout.items():
            if ".qkv_proj." in name:
                q, k, v = parts
                parts = (q, SlicePart(k.hf_name, 0, *kv), SlicePart(v.hf_name, 0, *kv))
            layout[name] = parts
        return layout


def factory() -> KvHeadModulo:
    return KvHeadModulo(CpuMockBackend())
