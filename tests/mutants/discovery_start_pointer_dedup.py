"""Discovery deduplicates by start pointer only: the first tensor seen at an address stands for
every tensor there, so a smaller view seen before a larger tensor at the same address shadows it
and the larger tensor's tail is never registered (ModelExpress PR #454 review; the
reference keeps the tensor spanning each overlap cluster)."""

from __future__ import annotations

from mx_reference.discovery import STORAGE_SUFFIX, PublishedTensor, iter_module_tensors
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class StartPointerDedupAdapter(ReferenceAdapter):
    def discover_tensors(self, model, backend=None):
        published = super().discover_tensors(model, backend)
        tensors = {}  # first-seen order, like the buggy loop's
        for name, t, _ in iter_module_tensors(model, backend or self.backend):
            tensors.setdefault(name, t)
        order = list(tensors)
        out = []
        for p in published:
            if p.name.endswith(STORAGE_SUFFIX) or not p.aliases:
                out.append(p)
                continue
            names = sorted((p.name, *p.aliases), key=order.index)
            # The bug: whichever name was seen first at the entry's address wins.
            first = next(n for n in names if tensors[n].data_ptr() == p.tensor.data_ptr())
            aliases = tuple(n for n in names if n != first)
            out.append(PublishedTensor(first, tensors[first], aliases))
        return out


def factory() -> StartPointerDedupAdapter:
    return StartPointerDedupAdapter(CpuMockBackend())
