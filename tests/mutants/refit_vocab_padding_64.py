"""The receiver assumes Megatron pads the vocab to a multiple of 64 per rank (an old default),
so with a vocab that is no multiple of the padding it cuts the trainer's embedding shards at the
wrong rows (issue 16: no refit check used such a vocab; Megatron-Core's default
``make_vocab_size_divisible_by`` is 128)."""

from __future__ import annotations

import dataclasses

from mx_reference.refit.receiver import RefitReceiver
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class Pad64Receiver(RefitReceiver):
    def __init__(self, model, **kwargs):
        target = kwargs["target"]
        kwargs["target"] = dataclasses.replace(target, vocab_divisible_by=64)  # the bug
        super().__init__(model, **kwargs)


class Pad64Adapter(ReferenceAdapter):
    receiver_class = Pad64Receiver


def factory() -> Pad64Adapter:
    return Pad64Adapter(CpuMockBackend())
