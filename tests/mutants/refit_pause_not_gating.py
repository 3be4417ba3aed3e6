"""``pause()`` sets the engine's paused flag but does not stop the scheduler: forwards already
running go on, and new ones are admitted, while the weights are swapped under them (Dynamo PR
#10901: the poller thread called the weight update while a forward could be reading; issue 16:
passed all 27 checks)."""

from __future__ import annotations

import contextlib

from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class FlagOnlyPauseAdapter(ReferenceAdapter):
    def __init__(self, backend):
        super().__init__(backend)
        self.flag = False

    def inference(self):
        return contextlib.nullcontext()  # the bug: the scheduler never looks at the flag

    def pause(self):
        self.flag = True

    def resume(self):
        self.flag = False

    @property
    def paused(self):
        return self.flag


def factory() -> FlagOnlyPauseAdapter:
    return FlagOnlyPauseAdapter(CpuMockBackend())
