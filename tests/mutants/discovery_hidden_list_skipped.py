"""Hidden-tensor discovery walks attributes, dicts and objects but not lists or tuples, so a
KV cache an attention layer keeps in a list (vLLM's ``Attention.kv_cache``) is never published
and a receiver's cache is never refreshed (issue 16: passed all 27 checks)."""

from __future__ import annotations

import re

from mx_reference.discovery import (
    adopted_buffer_name,
    collect_module_tensors,
    find_hidden_accel_tensors,
)
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class ListBlindAdapter(ReferenceAdapter):
    def discover_tensors(self, model, backend=None):
        backend = backend or self.backend
        owners = dict(model.named_modules())
        for owner, path, t in find_hidden_accel_tensors(model, backend):
            if re.search(r"\[\d+\]", path):  # the bug: sequence elements are not walked
                continue
            name = adopted_buffer_name(path)
            if not hasattr(owners[owner], name):
                owners[owner].register_buffer(name, t, persistent=False)
        return collect_module_tensors(model, backend)


def factory() -> ListBlindAdapter:
    return ListBlindAdapter(CpuMockBackend())
