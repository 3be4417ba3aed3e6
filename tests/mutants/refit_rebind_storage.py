"""Refit rebinds parameter storage (``param.data = new``) instead of copying into it: values
and logits are right, but every captured CUDA graph still reads the old addresses and replays
the previous weights (vLLM RFC #48312; shared/reference/graphs.md; the reference applies with
``param.data.copy_``)."""

from __future__ import annotations

from mx_reference.refit.apply import check_staged
from mx_reference.refit.receiver import RefitReceiver
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class RebindReceiver(RefitReceiver):
    def apply(self, tensors):
        check_staged(self.params, tensors)
        for name, new in tensors.items():
            self.params[name].data = new.detach().clone()  # the bug


class RebindAdapter(ReferenceAdapter):
    receiver_class = RebindReceiver


def factory() -> RebindAdapter:
    return RebindAdapter(CpuMockBackend())
