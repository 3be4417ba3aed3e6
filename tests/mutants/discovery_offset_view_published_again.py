"""Discovery merges tensors that share a start address but publishes a view at an offset
inside another tensor as an entry of its own, so those bytes are published (and pulled) twice
(issue 16: a contiguous view at an offset inside a published tensor passed all 27 checks)."""

from __future__ import annotations

from mx_reference.discovery import PublishedTensor, iter_module_tensors
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class OffsetViewAdapter(ReferenceAdapter):
    def discover_tensors(self, model, backend=None):
        published = super().discover_tensors(model, backend)
        tensors = dict((n, t) for n, t, _ in iter_module_tensors(model, backend or self.backend))
        out = []
        for p in published:
            same_start = tuple(a for a in p.aliases if tensors[a].data_ptr() == p.tensor.data_ptr())
            out.append(PublishedTensor(p.name, p.tensor, same_start))
            # the bug: an alias starting elsewhere in the entry becomes an entry of its own
            out += [PublishedTensor(a, tensors[a]) for a in p.aliases if a not in same_start]
        return out


def factory() -> OffsetViewAdapter:
    return OffsetViewAdapter(CpuMockBackend())
