"""Capture without the input-restoring postprocess: forward mutates inputs in place (spec-decode
pre-processing advances ``kv_lens`` and ``position_ids``), and with nothing undoing it after each
warmup and the capture, the mutation lands ``warmup_steps + 1`` times, so the graph is captured
against, and leaves behind, advanced attention metadata (TensorRT-LLM ``CUDAGraphRunner.capture``
before it took ``postprocess_fn``; TensorRT-LLM capture-postprocess PR)."""

from __future__ import annotations

from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class NoPostprocessAdapter(ReferenceAdapter):
    def capture_graph(self, key, forward_fn, inputs, postprocess_fn=None):
        return super().capture_graph(key, forward_fn, inputs)  # the bug: postprocess_fn dropped


def factory() -> NoPostprocessAdapter:
    return NoPostprocessAdapter(CpuMockBackend())
