"""Capture runner: warmups, capture, static input buffers, validated replay.

Shaped after TensorRT-LLM's ``CUDAGraphRunner``: graphs are keyed by the caller, inputs are a
dict passed as ``forward_fn(inputs)``, the inputs named in ``RunnerConfig.static_inputs`` live
in shared buffers sized for the largest batch, and every capture slices them. The backend picks
the graph: ``torch.cuda.CUDAGraph`` (one shared memory pool) for CUDA, :class:`SimulatedGraph`
for any other device, such as the simulator's CPU mock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch.utils._pytree import tree_leaves

from mx_reference.backends import AcceleratorBackend, resolve_backend
from mx_reference.graphs.ledger import (
    Ledger,
    check_ledger,
    input_tensors,
    ledger_of,
    module_tensors,
)
from mx_reference.graphs.liveness import LivenessTracker
from mx_reference.graphs.simulated import SimulatedGraph

T = TypeVar("T")
Inputs = dict[str, Any]
VALIDATION_MODES = ("off", "first", "always")


@dataclass
class RunnerConfig:
    """How a :class:`GraphRunner` stages inputs and validates replays.

    ``static_inputs`` maps an input name to its batch (token) dim; those inputs are copied into
    shared buffers with ``max_batch`` rows along that dim. ``validation`` is ``"off"``,
    ``"first"`` (the first replay of each graph) or ``"always"`` (debug). A replay input shorter
    than its capture is rejected unless ``pad_short_inputs``, which fills the tail with
    ``pad_value``. The input under ``metadata_key`` must be the very object captured.
    """

    static_inputs: dict[str, int] = field(default_factory=dict)
    max_batch: int = 1
    validation: str = "first"
    pad_short_inputs: bool = False
    pad_value: float = 0
    metadata_key: str | None = "attn_metadata"

    def __post_init__(self) -> None:
        if self.validation not in VALIDATION_MODES:
            raise ValueError(
                f"RunnerConfig.validation must be one of {VALIDATION_MODES}, got {self.validation!r}"
            )
        if self.max_batch < 1:
            raise ValueError(f"RunnerConfig.max_batch must be >= 1, got {self.max_batch}")


class Graph(Protocol):
    # True when capture executes ``fn`` (the simulated graph); a CUDA capture only records
    # kernels, so an in-place write of ``fn`` has not happened when it returns
    runs_fn_on_capture: bool

    def warmup(self, fn: Callable[[], object]) -> None: ...

    def capture(self, fn: Callable[[], T]) -> T: ...

    def replay(self) -> None: ...


class _CpuGraph(SimulatedGraph):
    runs_fn_on_capture = True

    def warmup(self, fn: Callable[[], object]) -> None:
        with torch.no_grad():
            fn()


class _CudaGraph:
    """``torch.cuda.CUDAGraph`` with side-stream warmups and a pool shared across captures."""

    runs_fn_on_capture = False

    def __init__(self, pool: Any):
        self._graph = torch.cuda.CUDAGraph()
        self._pool = pool

    def warmup(self, fn: Callable[[], object]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn: Callable[[], T]) -> T:
        with torch.no_grad(), torch.cuda.graph(self._graph, pool=self._pool):
            return fn()

    def replay(self) -> None:
        self._graph.replay()


@dataclass
class _Entry:
    graph: Graph
    inputs: Inputs  # what forward_fn saw at capture: static inputs are buffer slices
    output: Any
    ledger: Ledger
    liveness: LivenessTracker
    validated: bool = False


class GraphRunner:
    """Captures callables into graphs and replays them with validated, staged inputs.

    ``module``, when given, is the model the callables read: its parameters and buffers join
    every ledger under ``module.<name>``, so a refit that rebinds ``.data`` fails validation.
    """

    def __init__(
        self,
        config: RunnerConfig | None = None,
        *,
        backend: AcceleratorBackend | None = None,
        module: torch.nn.Module | None = None,
    ):
        self.config = config or RunnerConfig()
        self.backend = resolve_backend(backend)
        self.module = module
        self._entries: dict[Hashable, _Entry] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._pool_ptrs: set[int] = set()  # storages of captured outputs: the graphs' own memory
        self._cuda_pool: Any = None

    @property
    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def _new_graph(self) -> Graph:
        if self.backend.torch_device_type == "cuda":
            if self._cuda_pool is None:
                self._cuda_pool = torch.cuda.graph_pool_handle()
            return _CudaGraph(self._cuda_pool)
        return _CpuGraph()

    def _tensors(self, inputs: Inputs) -> Iterator[tuple[str, torch.Tensor]]:
        yield from input_tensors((), inputs, backend=self.backend)
        if self.module is not None:
            yield from module_tensors(self.module, backend=self.backend, prefix="module")

    def ledger(self, inputs: Inputs) -> Ledger:
        """The ledger validation compares: every input tensor, plus the module's tensors."""
        return ledger_of(self._tensors(inputs))

    def _static_slice(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The slice of ``name``'s shared buffer that a capture with ``t`` uses."""
        dim = self.config.static_inputs[name]
        rows = t.shape[dim]
        if rows > self.config.max_batch:
            raise ValueError(
                f"static input {name!r} has {rows} rows along dim {dim}, more than "
                f"RunnerConfig.max_batch={self.config.max_batch}"
            )
        buffer = self._buffers.get(name)
        if buffer is None:
            shape = list(t.shape)
            shape[dim] = self.config.max_batch
            buffer = torch.zeros(shape, dtype=t.dtype, device=t.device)
            self._buffers[name] = buffer
        elif buffer.dtype != t.dtype or _other_dims(buffer, dim) != _other_dims(t, dim):
            raise ValueError(
                f"static input {name!r} is {t.dtype} {tuple(t.shape)}, but its buffer is "
                f"{buffer.dtype} {tuple(buffer.shape)} (batch dim {dim})"
            )
        return buffer.narrow(dim, 0, rows)

    def capture(
        self,
        key: Hashable,
        forward_fn: Callable[[Inputs], T],
        inputs: Inputs,
        postprocess_fn: Callable[[Inputs], object] | None = None,
        warmup_steps: int = 2,
    ) -> T:
        """Warm up ``warmup_steps`` times, then capture ``forward_fn(inputs)`` under ``key``.

        ``postprocess_fn(inputs)`` runs after each warmup and after the capture, to undo what
        ``forward_fn`` mutates in place (TensorRT-LLM's spec-decode ``kv_lens``); without it
        such a mutation is applied ``warmup_steps + 1`` times. A CUDA capture only records the
        forward's kernels, so there it runs after the warmups only: undoing a write that never
        ran would leave the inputs one step behind (seen on an H200). Capture the largest
        batch first.
        Returns the output every replay of this graph overwrites.
        """
        if key in self._entries:
            raise ValueError(f"graph {key!r} is already captured; call clear() to recapture")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        missing = [n for n in self.config.static_inputs if n not in inputs]
        if missing:
            raise ValueError(f"graph {key!r}: static input(s) {missing} missing from inputs")
        static = dict(inputs)
        for name in self.config.static_inputs:
            static[name] = self._static_slice(name, inputs[name])
        for name in self.config.static_inputs:
            _copy_unless_same(static[name], inputs[name])

        def step() -> T:
            out = forward_fn(static)
            if postprocess_fn is not None:
                postprocess_fn(static)
            return out

        graph = self._new_graph()
        for _ in range(warmup_steps):
            graph.warmup(step)
        output = graph.capture(lambda: forward_fn(static))
        if postprocess_fn is not None and graph.runs_fn_on_capture:
            postprocess_fn(static)
        ledger = self.ledger(static)
        liveness = LivenessTracker(self._tensors(static), pool_owns=self._pool_ptrs.__contains__)
        self._pool_ptrs.update(
            t.untyped_storage().data_ptr()
            for t in tree_leaves(output)
            if isinstance(t, torch.Tensor)
        )
        self._entries[key] = _Entry(graph, static, output, ledger, liveness)
        return output

    def _entry(self, key: Hashable) -> _Entry:
        if key not in self._entries:
            raise KeyError(f"no graph captured under {key!r}; captured: {self.keys}")
        return self._entries[key]

    def graph(self, key: Hashable) -> Graph:
        """The graph captured under ``key``."""
        return self._entry(key).graph

    def captured_inputs(self, key: Hashable) -> Inputs:
        """The dict ``forward_fn`` saw at capture; static inputs are slices of shared buffers
        that callers may fill directly (replay then skips the copy)."""
        return self._entry(key).inputs

    def _replay_inputs(self, key: Hashable, entry: _Entry, inputs: Inputs) -> Inputs:
        """Check ``inputs`` against the capture; the dict the graph reads. Mutates nothing."""
        meta = self.config.metadata_key
        if meta is not None and meta in entry.inputs and inputs.get(meta) is not entry.inputs[meta]:
            raise ValueError(
                f"graph {key!r}: inputs[{meta!r}] is not the metadata object captured with the "
                "graph; update that object in place instead of building a new one"
            )
        effective = dict(inputs)
        for name, dim in self.config.static_inputs.items():
            if name not in inputs:
                raise ValueError(f"graph {key!r}: static input {name!r} missing from inputs")
            new, static = inputs[name], entry.inputs[name]
            rows, captured = new.shape[dim], static.shape[dim]
            if new.dtype != static.dtype or _other_dims(new, dim) != _other_dims(static, dim):
                raise ValueError(
                    f"graph {key!r}: static input {name!r} is {new.dtype} {tuple(new.shape)}, "
                    f"captured as {static.dtype} {tuple(static.shape)} (batch dim {dim})"
                )
            if rows > captured or (rows < captured and not self.config.pad_short_inputs):
                raise ValueError(
                    f"graph {key!r}: static input {name!r} has {rows} rows along dim {dim} but "
                    f"the graph was captured for {captured}; pad it to {captured} rows or set "
                    "RunnerConfig.pad_short_inputs"
                )
            effective[name] = static
        return effective

    def validate(self, key: Hashable, inputs: Inputs) -> None:
        """Raise if replaying ``key`` with ``inputs`` would read moved or dead memory.

        ``InputAddressError`` lists missing, added and changed paths; ``DeadInputError`` lists
        freed, re-pointed or resized inputs; ``ValueError`` reports a mis-shaped static input
        or a different metadata object.
        """
        entry = self._entry(key)
        check_ledger(key, entry.ledger, self.ledger(self._replay_inputs(key, entry, inputs)))
        entry.liveness.check(key)

    def replay(self, key: Hashable, inputs: Inputs) -> Any:
        """Copy static inputs into their buffers (unless already there), validate, replay.

        Returns the captured output object, overwritten by this replay. Validation follows
        ``RunnerConfig.validation``; a failed check leaves buffers and graph untouched.
        """
        entry = self._entry(key)
        effective = self._replay_inputs(key, entry, inputs)
        mode = self.config.validation
        if mode == "always" or (mode == "first" and not entry.validated):
            check_ledger(key, entry.ledger, self.ledger(effective))
            entry.liveness.check(key)
            entry.validated = True
        for name, dim in self.config.static_inputs.items():
            new, static = inputs[name], entry.inputs[name]
            rows = new.shape[dim]
            _copy_unless_same(static.narrow(dim, 0, rows), new)
            if rows < static.shape[dim]:
                static.narrow(dim, rows, static.shape[dim] - rows).fill_(self.config.pad_value)
        entry.graph.replay()
        return entry.output

    def clear(self) -> None:
        """Drop every graph, the static buffers and the pool (recapture starts from scratch)."""
        self._entries.clear()
        self._buffers.clear()
        self._pool_ptrs.clear()
        self._cuda_pool = None


def _other_dims(t: torch.Tensor, dim: int) -> tuple[int, ...]:
    return tuple(s for i, s in enumerate(t.shape) if i != dim)


def _copy_unless_same(dst: torch.Tensor, src: torch.Tensor) -> None:
    # make_graphed_callables' rule: an argument already at the static address is not copied
    if src.data_ptr() != dst.data_ptr() or src.shape != dst.shape:
        dst.copy_(src)
