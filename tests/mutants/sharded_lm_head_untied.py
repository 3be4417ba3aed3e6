"""An engine whose lm_head was untied by PyTorch's ``parallelize_module`` while its loader
still treats it as the embedding's alias: refit writes only the embedding and lm_head keeps
the old version (logits off by 2.0 in shared/reference/engines.md, section 2)."""

from __future__ import annotations

from mx_sim.conformance.sharded_adapter import VllmShapedAdapter
from mx_sim.cpu_mock import CpuMockBackend

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


class UntiedLmHead(VllmShapedAdapter):
    def build_sharded(self, kind, **kw):
        engine = super().build_sharded(kind, **kw)
        if engine.model.config.tie_word_embeddings:  # parallelize_module made its own copy
            engine.layout[LM_HEAD] = engine.layout[EMBED]
            engine.local[LM_HEAD] = engine.local[EMBED].clone()
        return engine

    def loader_layout(self, engine):  # the bug: lm_head taken for the embedding's alias
        tied = engine.model.config.tie_word_embeddings
        return {n: p for n, p in engine.layout.items() if not (tied and n == LM_HEAD)}


def factory() -> UntiedLmHead:
    return UntiedLmHead(CpuMockBackend())
