"""Discovery ignores the backend it is given and always uses the engine's own predicate, so a
caller asking for CUDA tensors gets CPU tensors (ModelExpress PR #454: discovery must
route through ``AcceleratorBackend.is_accel_tensor``; PR #438 review found ``is_cuda`` used
directly; modelexpress issue #439 "filter no-rdma tensor")."""

from __future__ import annotations

from mx_reference.discovery import discover
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class IgnoresBackendAdapter(ReferenceAdapter):
    def discover_tensors(self, model, backend=None):
        return discover(model, self.backend)  # the bug: ``backend`` is dropped


def factory() -> IgnoresBackendAdapter:
    return IgnoresBackendAdapter(CpuMockBackend())
