"""The tied weight is sent twice: discovery publishes every name of a tied parameter as its own
tensor (``named_parameters(remove_duplicate=False)``), so the embedding's bytes travel twice and
a receiver cannot tell that ``lm_head`` must stay tied (ModelExpress PR #454: ties
published once with aliases; shared/reference/discovery.md, tied weights)."""

from __future__ import annotations

import dataclasses

from mx_reference.discovery import discover
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class TieSentTwiceAdapter(ReferenceAdapter):
    def discover_tensors(self, model, backend=None):
        published = []
        for entry in discover(model, backend or self.backend):
            published.append(dataclasses.replace(entry, aliases=()))
            published += [  # the bug: each alias becomes a tensor of its own
                dataclasses.replace(entry, name=alias, aliases=()) for alias in entry.aliases
            ]
        return published


def factory() -> TieSentTwiceAdapter:
    return TieSentTwiceAdapter(CpuMockBackend())
