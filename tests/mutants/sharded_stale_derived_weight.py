"""A sharded engine whose forward reads a copy of a weight made at load, as an engine's
post-load repacking (a transposed, fused or quantized copy of a weight) is: refit updates the
parameter, every shard check passes, and the forward keeps computing with the old values. Only
the engine's own logits show it (transformers' TP engine, final norm frozen)."""

from __future__ import annotations

import torch

from mx_sim.conformance.hf_tp_adapter import HfTpAdapter
from mx_sim.cpu_mock import CpuMockBackend


class StaleDerivedWeight(HfTpAdapter):
    def build_sharded(self, kind, **kwargs):
        engine = super().build_sharded(kind, **kwargs)
        norm = engine.model.model.norm
        frozen = norm.weight.detach().clone()  # the bug: derived once, never refreshed

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            x = hidden.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            return frozen * x.to(hidden.dtype)

        norm.forward = forward
        return engine


def factory() -> StaleDerivedWeight:
    return StaleDerivedWeight(CpuMockBackend())
