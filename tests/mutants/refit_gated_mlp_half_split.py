"""Gated MLP split in half after concatenation: the TP ranks' Megatron fc1 shards
``[gate_r; up_r]`` are concatenated and the result halved, so with TP > 1 "gate" gets rank 0's
gate and up rows and "up" the other ranks' (shared/reference/refit.md: a naive half split must
be caught; the de-interleave has to happen per shard)."""

from __future__ import annotations

import torch

from mx_reference.refit.receiver import RefitReceiver
from mx_reference.refit.wire import GATED_STYLES
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class HalfSplitReceiver(RefitReceiver):
    def merge(self, spec, shards):
        if spec.style in GATED_STYLES:
            return torch.cat(shards, dim=spec.shard_axis)  # the bug: halved later as [gate; up]
        return super().merge(spec, shards)


class HalfSplitAdapter(ReferenceAdapter):
    receiver_class = HalfSplitReceiver


def factory() -> HalfSplitAdapter:
    return HalfSplitAdapter(CpuMockBackend())
