"""The engine's second capture site (model-specific finalizers) calls ``capture_tensor_attrs``
without the engine's backend, so it falls back to CUDA: on any other accelerator the finalizer's
tensors stay bare attributes and are published, if at all, under adopted ``_mx_`` names the
other side does not have (ModelExpress PR #454: "ensure both vLLM capture_tensor_attrs call
sites (post-load and model-specific finalizers) pass self.accelerator_backend")."""

from __future__ import annotations

from mx_reference.discovery import capture_tensor_attrs
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class FinalizerDefaultBackendAdapter(ReferenceAdapter):
    def finalize(self, model, fn):
        with capture_tensor_attrs(model):  # the bug: no backend, so CUDA's
            fn(model)


def factory() -> FinalizerDefaultBackendAdapter:
    return FinalizerDefaultBackendAdapter(CpuMockBackend())
