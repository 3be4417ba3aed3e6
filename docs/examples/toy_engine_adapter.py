"""A worked example: an engine adapter written against the protocol, not the reference class.

"ToyEngine" stands for your engine worker. It keeps its own weight loader, its own scheduler
gate (the reference ``EngineGate``) and its own graph runner; it has no MoE kernels and no FP8 path, so it does not declare those
capabilities and the suite skips their checks. Walk-through: ``docs/conformance.md``.

    mx-sim conformance --adapter toy_engine_adapter:factory     # with docs/examples on PYTHONPATH
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from mx_reference import adapter as caps
from mx_reference.discovery import capture_tensor_attrs, discover
from mx_reference.graphs.capture import GraphRunner
from mx_reference.ipc import (
    Decoder,
    Encoder,
    InlineChannel,
    SharedChannelConfig,
    SharedTensorReceiver,
    SharedTensorSender,
    TensorBuffer,
    TensorQueues,
)
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.poller import EngineGate
from mx_reference.refit.receiver import RefitReceiver
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import TinyModelSpec, build_tiny_model


def load_in_place(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]):
    """ToyEngine's loader: validate everything first, then copy into the existing storage."""
    params = dict(model.named_parameters())
    staged = dict(named_tensors)
    for name, new in staged.items():
        if name not in params:
            raise ValueError(f"{name}: the model has no parameter of that name")
        old = params[name]
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(
                f"{name}: got {tuple(new.shape)} {new.dtype}, "
                f"parameter is {tuple(old.shape)} {old.dtype}"
            )
    with torch.no_grad():
        for name, new in staged.items():
            params[name].copy_(new)  # never `params[name].data = new`: graphs read the old storage


class ToyEngineReceiver(RefitReceiver):
    """The reference refit cycle with ToyEngine's loader as the apply step."""

    def apply(self, tensors: Mapping[str, torch.Tensor]) -> None:
        load_in_place(self.model, tensors.items())


class ToyEngineAdapter:
    def __init__(self) -> None:
        self.backend = CpuMockBackend()
        self.capabilities = caps.CAPABILITIES - {caps.MOE, caps.FP8, caps.SHARDED}
        self.families = ("llama", "qwen2", "qwen3")  # the model families this engine serves
        self.gate = EngineGate()  # its scheduler: forwards run inside gate.inference()
        self.graphs = GraphRunner(backend=self.backend)

    def build_model(self, kind: str, *, seed: int = 0, **config: Any) -> torch.nn.Module:
        return build_tiny_model(kind, TinyModelSpec(**config), seed=seed)

    def post_load(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], None]) -> None:
        with capture_tensor_attrs(model, self.backend):
            fn(model)

    def finalize(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], None]) -> None:
        self.post_load(model, fn)  # the same capture at the engine's second site

    def discover_tensors(self, model, backend=None):
        return discover(model, backend or self.backend)

    def load_weights(self, model, named_tensors) -> None:
        load_in_place(model, named_tensors)

    def inference(self):
        return self.gate.inference()

    def pause(self) -> None:
        self.gate.pause()

    def resume(self) -> None:
        self.gate.resume()

    @property
    def paused(self) -> bool:
        return self.gate.paused

    def capture_graph(self, key, forward_fn, inputs, postprocess_fn=None):
        return self.graphs.capture(key, forward_fn, inputs, postprocess_fn)

    def replay_graph(self, key, inputs):
        return self.graphs.replay(key, inputs)

    def make_channel(self, kind: str, producers: int = 1, **options: Any):
        if kind == "inline":
            channel = InlineChannel()
            return channel, channel
        if kind != "shared":
            raise ValueError(f"make_channel: unknown kind {kind!r}")
        queues, config = TensorQueues.local(producers, 1), SharedChannelConfig(**options)
        return SharedTensorSender(queues, 0, config), SharedTensorReceiver(queues, 0, config)

    def attach_producer(self, channel, slot: int):
        sink, _ = channel
        return SharedTensorSender(sink.queues, slot, sink.config)

    def make_codec(self, channel=None):
        sink, source = channel or self.make_channel("inline")
        return Encoder(sink), Decoder(source=source)

    def make_request_tracker(self, ttl_s: float = 60.0) -> TensorBuffer:
        return TensorBuffer(ttl_s)

    def target_layout(self, *, tp_size, tp_rank, pp_size, pp_rank, global_rank) -> TargetLayout:
        return TargetLayout(tp_size=tp_size, tp_rank=tp_rank)

    def make_receiver(self, model: torch.nn.Module, **kwargs: Any) -> ToyEngineReceiver:
        kwargs.setdefault("backend", self.backend)
        return ToyEngineReceiver(model, **kwargs)


def factory() -> ToyEngineAdapter:
    return ToyEngineAdapter()
