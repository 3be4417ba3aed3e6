"""A CPU stand-in for ``torch.cuda.CUDAGraph`` with the same address semantics.

Capture runs the callable once under a ``TorchDispatchMode`` and records every ATen op with the
storages it read. Replay re-runs only those ops, against the captured storages:

- inputs are read from the storage they had at capture, not from whatever tensor the caller
  holds now, so an input that was not copied into its static buffer replays stale data, exactly
  the silent bug a real graph has;
- inputs are held weakly (a graph holds raw pointers); replaying after one was freed, re-pointed
  with ``set_()`` or grown with ``resize_()`` raises :class:`SimulatedMemoryError` where CUDA
  would read freed memory;
- fresh op outputs live in memory the graph owns and are overwritten in place by each replay, so
  the output a capture returned is the output every replay updates;
- Python side effects inside the callable are not replayed (pytorch#114844);
- ops that copy device data to the host (``.item()``, ``torch.equal``, ``bool(t)``) raise
  :class:`GraphCaptureError` during capture, as CUDA does; so does a second concurrent capture.

Unlike CUDA, capture also executes the ops once, so in-place updates made by the callable are
applied during capture (the warmup-hygiene tests rely on seeing them).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

T = TypeVar("T")

aten = torch.ops.aten
_HOST_SYNC_OPS = frozenset(
    {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
)


class GraphCaptureError(RuntimeError):
    """Something a CUDA stream capture forbids happened while capturing."""


class SimulatedMemoryError(RuntimeError):
    """Replay would read memory the graph no longer owns (CUDA: illegal access or garbage)."""


class _Slot(int):
    """Index of a tensor in the replay environment (distinguishes tensors from constants)."""


@dataclass(frozen=True)
class _External:
    """A captured input: a raw pointer into a storage the graph does not own."""

    storage: weakref.ref
    ptr: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> _External:
        storage = t.untyped_storage()
        return cls(
            weakref.ref(storage),
            storage.data_ptr(),
            int(t.storage_offset()),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )

    def materialize(self) -> torch.Tensor:
        storage = self.storage()
        if storage is None:
            raise SimulatedMemoryError(
                f"simulated illegal memory access: captured input storage {self.ptr:#x} was freed"
            )
        if storage.data_ptr() != self.ptr:
            raise SimulatedMemoryError(
                f"simulated illegal memory access: captured input storage {self.ptr:#x} "
                f"was reallocated at {storage.data_ptr():#x}"
            )
        empty = torch.empty(0, dtype=self.dtype, device=storage.device)
        return empty.set_(storage, self.offset, self.size, self.stride)


@dataclass(frozen=True)
class _Op:
    func: Any  # an OpOverload
    leaves: list  # flattened (args, kwargs): _Slot for tensors, constants otherwise
    spec: Any  # TreeSpec of (args, kwargs)
    outputs: list[tuple[int, _Slot, bool]]  # (index among output leaves, slot, owned by graph)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: SimulatedGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_SYNC_OPS:
            raise GraphCaptureError(
                f"{func} copies device data to the host, which is not allowed while a graph "
                "is capturing; move it out of the captured callable"
            )
        out = func(*args, **kwargs)
        self.graph._record(func, args, kwargs, out)
        return out


class SimulatedGraph:
    """Capture a callable's ATen ops once; ``replay()`` re-runs them on the captured storages."""

    _capturing = False  # one capture at a time per process, as with CUDA

    def __init__(self) -> None:
        self._ops: list[_Op] = []
        self._externals: dict[_Slot, _External] = {}
        self._owned: dict[_Slot, torch.Tensor] = {}  # the graph's own memory (its "pool")
        self._slot_of: dict[int, _Slot] = {}  # id(tensor) -> slot, during capture only
        self._alive: list[torch.Tensor] = []  # keeps ids unique during capture
        self._num_slots = 0

    @property
    def num_ops(self) -> int:
        return len(self._ops)

    def _new_slot(self, t: torch.Tensor) -> _Slot:
        slot = _Slot(self._num_slots)
        self._num_slots += 1
        self._slot_of[id(t)] = slot
        self._alive.append(t)
        return slot

    def _record(self, func, args: tuple, kwargs: dict, out: object) -> None:
        flat, spec = tree_flatten((args, kwargs))
        leaves: list = []
        for x in flat:
            if not isinstance(x, torch.Tensor):
                leaves.append(x)
            elif id(x) in self._slot_of:
                leaves.append(self._slot_of[id(x)])
            else:
                slot = self._new_slot(x)
                self._externals[slot] = _External.of(x)
                leaves.append(slot)
        read = {x.untyped_storage().data_ptr() for x in flat if isinstance(x, torch.Tensor)}
        outputs = []
        for i, o in enumerate(tree_leaves(out)):
            if not isinstance(o, torch.Tensor):
                continue
            slot = self._new_slot(o)
            owned = o.untyped_storage().data_ptr() not in read  # views and in-place ops alias
            if owned:
                self._owned[slot] = o
            outputs.append((i, slot, owned))
        self._ops.append(_Op(func, leaves, spec, outputs))

    def capture(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` once, recording its ops; returns its output, which replays overwrite."""
        if SimulatedGraph._capturing:
            raise GraphCaptureError("another graph is already capturing in this process")
        if self._ops:
            raise GraphCaptureError("this graph was already captured; create a new one")
        SimulatedGraph._capturing = True
        try:
            with torch.no_grad(), _Recorder(self):
                return fn()
        finally:
            SimulatedGraph._capturing = False
            self._slot_of.clear()
            self._alive.clear()

    def replay(self) -> None:
        """Re-run the captured ops on the captured storages (see the module docstring)."""
        env: dict[_Slot, torch.Tensor] = {s: e.materialize() for s, e in self._externals.items()}
        env.update(self._owned)
        with torch.no_grad():
            for op in self._ops:
                flat = [env[x] if type(x) is _Slot else x for x in op.leaves]
                args, kwargs = tree_unflatten(flat, op.spec)
                results = tree_leaves(op.func(*args, **kwargs))
                for i, slot, owned in op.outputs:
                    if owned:
                        env[slot].copy_(results[i])
                    else:
                        env[slot] = results[i]
