"""Gated MLP split in half after concatenation: the TP ranks' Megatron fc1 shards
``[gate_r; up_r]`` are concatenated and the result halved, so with TP > 1 "gate" gets rank 0's
gate and up rows and "up" the other ranks' (shared/reference/refit.md: a naive half split must
be caught; the de-interleave has to happen per shard)."""

from __future__ import annotations

import torch

from mx_reference.refit.descriptors import GATED_ROLES
from mx_reference.refit.receiver import RefitReceiver
from mx_sim.adapters import ReferenceAdapter
from mx_sim.backends import CpuMockBackend


class HalfSplitReceiver(RefitReceiver):
    def _merge(self, spec, shards):
        if spec.role in GATED_ROLES:
            return torch.cat(shards, dim=spec.shard_axis)  # the bug: halved later as [gate; up]
        return super()._merge(spec, shards)


class HalfSplitAdapter(ReferenceAdapter):
    receiver_class = HalfSplitReceiver


def factory() -> HalfSplitAdapter:
    return HalfSplitAdapter(CpuMockBackend())
