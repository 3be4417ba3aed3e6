"""Accelerator backends: the one place that knows which device a tensor lives on.

Discovery, registration and refit never test ``tensor.is_cuda`` themselves; they ask an
:class:`AcceleratorBackend`. Helpers that take ``backend=None`` default to CUDA (as ModelExpress
does), so CPU tensors are ignored unless a caller passes a backend that accepts them; the
simulator always passes its CPU mock explicitly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

NIXL_VRAM = "VRAM"
NIXL_DRAM = "DRAM"


@runtime_checkable
class AcceleratorBackend(Protocol):
    """What mx-harness needs from an accelerator family.

    ``name`` is the family for logs and policy; ``torch_device_type`` builds tensors and may
    differ from it. ``nixl_mem_type`` is the NIXL memory type registrations use. The capability
    flags gate optional paths: ``rdma_p2p`` (direct NIXL pulls into device memory),
    ``pool_registration`` (register allocator pools instead of tensors), ``vmm`` (virtual memory
    arenas) and ``gds`` (GPUDirect Storage).
    """

    # Read-only in the protocol so frozen dataclasses satisfy it.
    @property
    def name(self) -> str: ...

    @property
    def torch_device_type(self) -> str: ...

    @property
    def nixl_mem_type(self) -> str: ...

    @property
    def rdma_p2p(self) -> bool: ...

    @property
    def pool_registration(self) -> bool: ...

    @property
    def vmm(self) -> bool: ...

    @property
    def gds(self) -> bool: ...

    def is_accel_tensor(self, t: object) -> bool:
        """True when ``t`` is a tensor living on this backend's device type."""
        ...

    def torch_device(self, index: int | None = None) -> torch.device: ...

    def set_device(self, index: int) -> None: ...

    def current_device(self) -> int: ...

    def synchronize(self, index: int | None = None) -> None: ...

    def empty_cache(self) -> None: ...


@dataclass(frozen=True)
class CudaBackend:
    """NVIDIA CUDA (and ROCm builds of torch, which report device type ``cuda``)."""

    name: str = "cuda"
    torch_device_type: str = "cuda"
    nixl_mem_type: str = NIXL_VRAM
    rdma_p2p: bool = True
    pool_registration: bool = True
    vmm: bool = True
    gds: bool = True

    def is_accel_tensor(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.is_cuda

    def torch_device(self, index: int | None = None) -> torch.device:
        return torch.device("cuda", self.current_device() if index is None else index)

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def synchronize(self, index: int | None = None) -> None:
        torch.cuda.synchronize(index)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class TorchDeviceBackend:
    """Any other torch device family with a ``torch.<type>`` module (xpu, mps, hpu, ...).

    Capabilities are off: each family must prove RDMA, pool registration, VMM and GDS before a
    dedicated backend turns them on.
    """

    torch_device_type: str
    nixl_mem_type: str = NIXL_VRAM
    rdma_p2p: bool = False
    pool_registration: bool = False
    vmm: bool = False
    gds: bool = False

    @property
    def name(self) -> str:
        return self.torch_device_type

    def _module(self):
        module = getattr(torch, self.torch_device_type, None)
        if module is None:
            raise RuntimeError(f"this torch build has no torch.{self.torch_device_type} module")
        return module

    def is_accel_tensor(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.torch_device_type

    def torch_device(self, index: int | None = None) -> torch.device:
        return torch.device(
            self.torch_device_type, self.current_device() if index is None else index
        )

    def set_device(self, index: int) -> None:
        self._module().set_device(index)

    def current_device(self) -> int:
        module = self._module()
        return module.current_device() if hasattr(module, "current_device") else 0

    def synchronize(self, index: int | None = None) -> None:
        module = self._module()
        if index is None:
            module.synchronize()
            return
        try:
            module.synchronize(index)
        except TypeError:  # some families' synchronize() takes no device argument
            previous = self.current_device()
            self.set_device(index)
            try:
                module.synchronize()
            finally:
                self.set_device(previous)

    def empty_cache(self) -> None:
        empty_cache = getattr(self._module(), "empty_cache", None)
        if empty_cache is not None:
            empty_cache()


def _device_available(device_type: str) -> bool:
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    if is_available is None:
        return False
    with contextlib.suppress(Exception):  # a failing probe means "not available"
        return bool(is_available())
    return False


GENERIC_DEVICE_TYPES = ("xpu", "mps", "hpu", "mtia")


def supported_device_types() -> list[str]:
    """Device types :func:`backend_for` accepts on this machine (``cuda`` always)."""
    return ["cuda"] + [t for t in GENERIC_DEVICE_TYPES if _device_available(t)]


def backend_for(device: str | torch.device) -> AcceleratorBackend:
    """Pick the backend for ``device``.

    ``cuda`` maps to :class:`CudaBackend` without probing (a CPU-only planner may describe CUDA
    targets). Other families need an available ``torch.<type>`` module. ``cpu`` is not an
    accelerator: the simulator passes ``mx_sim.cpu_mock.CpuMockBackend`` explicitly.
    """
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"unknown device {device!r}; supported: {', '.join(supported_device_types())}"
        ) from exc
    if device_type == "cuda":
        return CudaBackend()
    if device_type in GENERIC_DEVICE_TYPES and _device_available(device_type):
        return TorchDeviceBackend(device_type)
    raise ValueError(
        f"no accelerator backend for device {device!r} (type {device_type!r}); "
        f"supported here: {', '.join(supported_device_types())}"
    )


def resolve_backend(backend: AcceleratorBackend | None) -> AcceleratorBackend:
    """The default every helper applies: ``None`` means CUDA."""
    return CudaBackend() if backend is None else backend
