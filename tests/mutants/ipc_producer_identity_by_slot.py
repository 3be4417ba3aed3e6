"""A producer is known to its consumer by its slot alone, so when an API server restarts on the
same slot its message ids start again below the consumer's watermark for that slot, and its
first messages are refused as stale (or their tensors dropped as late) until it catches up
(issue 16: several producers on one consumer, a restarted one included; the reference gives
each incarnation its own producer id)."""

from __future__ import annotations

from mx_reference.ipc import SharedTensorSender
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class SlotIdentitySender(SharedTensorSender):
    def __init__(self, queues, slot, config=None):
        super().__init__(queues, slot, config)
        self.producer_id = f"p{slot}"  # the bug: the same id for every incarnation


class SlotIdentityAdapter(ReferenceAdapter):
    sender_class = SlotIdentitySender


def factory() -> SlotIdentityAdapter:
    return SlotIdentityAdapter(CpuMockBackend())
