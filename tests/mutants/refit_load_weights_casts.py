"""``load_weights`` casts every incoming tensor to its parameter's dtype, so a trainer that
sends bf16 into an fp32 engine (or the reverse) is silently rounded instead of refused
(issue 16: the protocol promises ``ValueError``; ``param.data.copy_`` casts quietly)."""

from __future__ import annotations

from mx_reference.refit.apply import apply_in_place, model_parameters
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class CastingLoadAdapter(ReferenceAdapter):
    def load_weights(self, model, named_tensors):
        params = model_parameters(model)
        cast = {n: t.to(params[n].dtype) if n in params else t for n, t in named_tensors}
        apply_in_place(params, cast)  # the bug: the cast hides a dtype mismatch


def factory() -> CastingLoadAdapter:
    return CastingLoadAdapter(CpuMockBackend())
