"""The CPU mock accelerator backend the simulator passes everywhere.

It treats CPU tensors as accelerator tensors, registers as NIXL ``DRAM``, has every capability
off and records device calls so tests can assert them. Under it, CPU tensors are discovered;
under the default CUDA backend they are ignored, and the same tests run both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mx_reference.backends import NIXL_DRAM


@dataclass
class CpuMockBackend:
    """A mock accelerator whose "device memory" is CPU memory."""

    name: str = "cpu-mock"
    torch_device_type: str = "cpu"
    nixl_mem_type: str = NIXL_DRAM
    rdma_p2p: bool = False
    pool_registration: bool = False
    vmm: bool = False
    gds: bool = False
    set_device_calls: list[int] = field(default_factory=list)
    synchronize_calls: list[int | None] = field(default_factory=list)
    empty_cache_calls: int = 0
    _device: int = 0

    def is_accel_tensor(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.torch_device_type

    def torch_device(self, index: int | None = None) -> torch.device:
        return torch.device(self.torch_device_type)

    def set_device(self, index: int) -> None:
        self.set_device_calls.append(index)
        self._device = index

    def current_device(self) -> int:
        return self._device

    def synchronize(self, index: int | None = None) -> None:
        self.synchronize_calls.append(index)

    def empty_cache(self) -> None:
        self.empty_cache_calls += 1
