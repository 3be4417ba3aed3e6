"""Abort counts the right tensors but parks them until the TTL sweep instead of dropping them,
so an aborted request's shared memory stays held for up to ``ttl_s`` (issue 16: returned the
right count and passed all 27 checks)."""

from __future__ import annotations

from mx_reference.ipc import TensorBuffer, normalize_request_ids
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class ParkingBuffer(TensorBuffer):
    def __init__(self, ttl_s):
        super().__init__(ttl_s)
        self.parked = []

    def abort(self, request_ids):
        ids = normalize_request_ids(request_ids)
        doomed = [k for k, b in self.entries.items() if b.request_id in ids]
        for key in doomed:
            self.parked.append(self.entries.pop(key))  # the bug: freed by expire(), later
        self.aborted += len(doomed)
        return len(doomed)

    def expire(self):
        self.parked.clear()
        return super().expire()


class ParkingAbortAdapter(ReferenceAdapter):
    def make_request_tracker(self, ttl_s=60.0):
        return ParkingBuffer(ttl_s)


def factory() -> ParkingAbortAdapter:
    return ParkingAbortAdapter(CpuMockBackend())
