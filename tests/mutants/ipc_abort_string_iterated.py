"""Abort iterates its argument, so one request id given as a ``str`` is taken as a collection of
one-character ids: ``abort("req-1")`` frees nothing of request "req-1" (its tensors leak until the
TTL) and frees requests "r", "e", "q", "-" and "1" (vLLM PR #32104 review: the tensor IPC abort
path iterated the characters of a lone request id; vLLM PR #32104)."""

from __future__ import annotations

from mx_reference.ipc import TensorBuffer
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class CharacterAbortBuffer(TensorBuffer):
    def abort(self, request_ids):
        ids = set(request_ids)  # the bug: a str becomes its characters
        doomed = [k for k, b in self.entries.items() if b.request_id in ids]
        for key in doomed:
            del self.entries[key]
        self.aborted += len(doomed)
        return len(doomed)


class CharacterAbortAdapter(ReferenceAdapter):
    def make_request_tracker(self, ttl_s=60.0):
        return CharacterAbortBuffer(ttl_s)


def factory() -> CharacterAbortAdapter:
    return CharacterAbortAdapter(CpuMockBackend())
