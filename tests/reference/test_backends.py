import pytest
import torch

from mx_reference.backends import (
    AcceleratorBackend,
    CudaBackend,
    TorchDeviceBackend,
    backend_for,
    resolve_backend,
    supported_device_types,
)
from mx_sim.cpu_mock import CpuMockBackend


def test_every_backend_satisfies_the_protocol():
    for backend in (CudaBackend(), TorchDeviceBackend("xpu"), CpuMockBackend()):
        assert isinstance(backend, AcceleratorBackend)


def test_cuda_backend_ignores_cpu_tensors():
    backend = CudaBackend()
    assert not backend.is_accel_tensor(torch.zeros(3))
    assert not backend.is_accel_tensor("not a tensor")
    assert backend.nixl_mem_type == "VRAM"
    assert backend.rdma_p2p and backend.pool_registration and backend.vmm and backend.gds


def test_mock_backend_accepts_cpu_tensors_and_records_calls():
    backend = CpuMockBackend()
    assert backend.is_accel_tensor(torch.zeros(3))
    assert not backend.is_accel_tensor(torch.zeros(3).numpy())
    assert backend.nixl_mem_type == "DRAM"
    assert not (backend.rdma_p2p or backend.pool_registration or backend.vmm or backend.gds)
    backend.set_device(0)
    backend.synchronize(0)
    backend.synchronize()
    backend.empty_cache()
    assert backend.set_device_calls == [0]
    assert backend.synchronize_calls == [0, None]
    assert backend.empty_cache_calls == 1
    assert backend.torch_device(3) == torch.device("cpu")


def test_generic_backend_matches_by_device_type():
    backend = TorchDeviceBackend("meta")
    assert backend.name == "meta"
    assert backend.is_accel_tensor(torch.empty(2, device="meta"))
    assert not backend.is_accel_tensor(torch.empty(2))
    assert not (backend.rdma_p2p or backend.pool_registration or backend.vmm or backend.gds)


def test_generic_backend_without_torch_module_raises():
    with pytest.raises(RuntimeError, match="torch.nosuchdevice"):
        TorchDeviceBackend("nosuchdevice").set_device(0)


def test_generic_synchronize_falls_back_when_device_argument_is_refused(monkeypatch):
    calls = []

    class FakeModule:
        current = 7

        def synchronize(self, *args):
            if args:
                raise TypeError("no device argument")
            calls.append(("sync", None))

        def set_device(self, index):
            calls.append(("set", index))
            FakeModule.current = index

        def current_device(self):
            return FakeModule.current

    monkeypatch.setattr(torch, "fakedev", FakeModule(), raising=False)
    TorchDeviceBackend("fakedev").synchronize(2)
    assert calls == [("set", 2), ("sync", None), ("set", 7)]


def test_backend_for_cuda_needs_no_probe():
    assert isinstance(backend_for("cuda"), CudaBackend)
    assert isinstance(backend_for(torch.device("cuda", 1)), CudaBackend)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backend_for_unsupported_device_names_device_and_supported_types(device):
    with pytest.raises(ValueError, match=f"{device!r}.*supported here: cuda"):
        backend_for(device)


def test_backend_for_garbage_device():
    with pytest.raises(ValueError, match="'gpu!'"):
        backend_for("gpu!")


def test_default_backend_is_cuda():
    assert isinstance(resolve_backend(None), CudaBackend)
    mock = CpuMockBackend()
    assert resolve_backend(mock) is mock
    assert supported_device_types()[0] == "cuda"


@pytest.mark.gpu
def test_cuda_backend_on_a_gpu():
    backend = CudaBackend()
    t = torch.zeros(4, device="cuda")
    assert backend.is_accel_tensor(t)
    backend.set_device(0)
    assert backend.current_device() == 0
    backend.synchronize(0)
    backend.empty_cache()
    assert backend.torch_device() == torch.device("cuda", 0)
