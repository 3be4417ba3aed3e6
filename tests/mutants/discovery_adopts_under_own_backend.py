"""Discovery adopts hidden tensors with the engine's own backend whatever backend it is asked
about, so merely listing the CUDA tensors of a model registers buffers on it as a side effect
(issue 16: missed on CPU CI, where the adapter's own backend is the CPU mock)."""

from __future__ import annotations

from mx_reference.discovery import adopt_hidden_tensors, collect_module_tensors
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class OwnBackendAdoptionAdapter(ReferenceAdapter):
    def discover_tensors(self, model, backend=None):
        adopt_hidden_tensors(model, self.backend)  # the bug: not ``backend``
        return collect_module_tensors(model, backend or self.backend)


def factory() -> OwnBackendAdoptionAdapter:
    return OwnBackendAdoptionAdapter(CpuMockBackend())
