"""A sharded loader that splits the vocab as Megatron pads it (multiples of 128 x TP, padding
on the last rank) instead of the engine's ``torch.chunk`` split: at vocab 200 and TP 2 rank 0
expects 128 rows where it holds 100 (vLLM's ``VocabParallelEmbedding`` pads its own way)."""

from __future__ import annotations

from mx_reference.refit.layouts import vocab_range
from mx_reference.refit.shards import SlicePart
from mx_sim.conformance.sharded_adapter import VllmShapedAdapter
from mx_sim.cpu_mock import CpuMockBackend


class VocabPaddedSplit(VllmShapedAdapter):
    def loader_layout(self, engine):
        layout = dict(engine.layout)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in layout:
                vocab = engine.meta[name].shape[0]
                rows = vocab_range(vocab, engine.tp_size, engine.tp_rank)  # the bug
                layout[name] = (SlicePart(name, 0, *rows),)
        return layout


def factory() -> VocabPaddedSplit:
    return VocabPaddedSplit(CpuMockBackend())
