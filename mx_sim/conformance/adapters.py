"""The reference engine adapter: the behaviour every engine adapter is checked against.

:class:`ReferenceAdapter` implements :class:`mx_reference.adapter.EngineAdapter` over real HF
``transformers`` models built from tiny configs, delegating every step to ``mx_reference``. It
takes the accelerator backend as a parameter: :func:`reference_adapter` (the CPU mock, what
``tox -e sim`` checks) and :func:`cuda_reference_adapter` (real CUDA, for ``tox -e gpu``) are the
factories ``--mx-adapter`` accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from mx_reference import adapter as caps
from mx_reference.backends import AcceleratorBackend, CudaBackend
from mx_reference.discovery import PublishedTensor, capture_tensor_attrs, discover
from mx_reference.graphs.capture import GraphRunner, RunnerConfig
from mx_reference.ipc.codec import Decoder, Encoder, InlineChannel, TensorSink, TensorSource
from mx_reference.ipc.requests import TensorBuffer
from mx_reference.ipc.shared import (
    SharedChannelConfig,
    SharedTensorReceiver,
    SharedTensorSender,
    TensorQueues,
)
from mx_reference.refit.apply import apply_in_place, model_parameters
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.poller import EngineGate
from mx_reference.refit.receiver import RefitReceiver
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import MODEL_BUILDERS, TinyModelSpec, build_tiny_model


class ReferenceAdapter:
    """An engine worker made of ``mx_reference`` parts, on ``backend``.

    Its models are plain HF models, so HF naming is also the engine's naming and
    ``load_weights`` is an all-or-nothing in-place copy.
    """

    # conformance mutants swap in subclasses
    receiver_class: type[RefitReceiver] = RefitReceiver
    sender_class: type[SharedTensorSender] = SharedTensorSender

    def __init__(self, backend: AcceleratorBackend):
        self._backend = backend
        self.gate = EngineGate()
        self.graphs = GraphRunner(RunnerConfig(), backend=backend)

    @property
    def backend(self) -> AcceleratorBackend:
        return self._backend

    @property
    def families(self) -> tuple[str, ...]:
        """Every tiny model family of :data:`~mx_sim.fixtures.MODEL_BUILDERS`."""
        return tuple(MODEL_BUILDERS)

    @property
    def capabilities(self) -> frozenset[str]:
        """Everything but :data:`~mx_reference.adapter.SHARDED`: each rank holds the full
        model (the sharded reference is :mod:`~mx_sim.conformance.sharded_adapter`)."""
        return caps.CAPABILITIES - {caps.SHARDED}

    # -- models and discovery --------------------------------------------------------------

    def build_model(self, kind: str, *, seed: int = 0, **config: Any) -> torch.nn.Module:
        """``kind`` is a :data:`mx_sim.fixtures.MODEL_BUILDERS` family; ``config`` overrides
        :class:`~mx_sim.fixtures.TinyModelSpec` fields."""
        model = build_tiny_model(kind, TinyModelSpec(**config), seed=seed)
        return model.to(self.backend.torch_device())

    def post_load(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], None]) -> None:
        """Run post-load processing ``fn(model)`` with bare tensor assignments captured as
        buffers (:func:`~mx_reference.discovery.capture_tensor_attrs`)."""
        with capture_tensor_attrs(model, self.backend):
            fn(model)

    def finalize(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], None]) -> None:
        """A model-specific finalizer: captured exactly as :meth:`post_load`."""
        self.post_load(model, fn)

    def discover_tensors(
        self, model: torch.nn.Module, backend: AcceleratorBackend | None = None
    ) -> list[PublishedTensor]:
        return discover(model, backend or self.backend)

    def load_weights(
        self, model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> None:
        apply_in_place(model_parameters(model), dict(named_tensors))

    # -- engine control --------------------------------------------------------------------

    def inference(self) -> AbstractContextManager[None]:
        return self.gate.inference()

    def pause(self) -> None:
        self.gate.pause()

    def resume(self) -> None:
        self.gate.resume()

    @property
    def paused(self) -> bool:
        return self.gate.paused

    # -- graphs ----------------------------------------------------------------------------

    def capture_graph(
        self,
        key: Any,
        forward_fn: Callable[..., Any],
        inputs: Mapping[str, Any],
        postprocess_fn: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> Any:
        return self.graphs.capture(key, forward_fn, inputs, postprocess_fn)

    def replay_graph(self, key: Any, inputs: Mapping[str, Any]) -> Any:
        return self.graphs.replay(key, inputs)

    # -- IPC -------------------------------------------------------------------------------

    def make_codec(
        self, channel: tuple[TensorSink, TensorSource] | None = None
    ) -> tuple[Encoder, Decoder]:
        """An encoder over ``channel``'s sink and a decoder over its source (default: inline)."""
        sink, source = self.make_channel("inline") if channel is None else channel
        return Encoder(sink), Decoder(source=source)

    def make_channel(
        self, kind: str, producers: int = 1, **options: Any
    ) -> tuple[TensorSink, TensorSource]:
        """``inline``: one :class:`InlineChannel` as both ends. ``shared``: a
        :class:`SharedTensorSender` (slot 0 of ``producers``) and a
        :class:`SharedTensorReceiver` over in-process queues (``options`` go to
        :class:`SharedChannelConfig`)."""
        if kind == "inline":
            channel = InlineChannel()
            return channel, channel
        if kind == "shared":
            queues = TensorQueues.local(num_producers=producers, num_consumers=1)
            config = SharedChannelConfig(**options)
            return self.sender_class(queues, 0, config), SharedTensorReceiver(queues, 0, config)
        raise ValueError(f"make_channel: unknown kind {kind!r}; expected 'inline' or 'shared'")

    def attach_producer(
        self, channel: tuple[TensorSink, TensorSource], slot: int
    ) -> SharedTensorSender:
        """A new sender on the queues of ``channel``'s sink, at ``slot``: a new incarnation
        (its own producer id) even at a slot already used."""
        sink, _ = channel
        if not isinstance(sink, SharedTensorSender):
            raise TypeError(
                f"attach_producer: field 'channel': a {type(sink).__name__} sink, "
                "not a shared channel's"
            )
        return self.sender_class(sink.queues, slot, sink.config)

    def make_request_tracker(self, ttl_s: float = 60.0) -> TensorBuffer:
        """A :class:`TensorBuffer`: tensors buffered per request, freed by ``abort``."""
        return TensorBuffer(ttl_s)

    # -- refit -----------------------------------------------------------------------------

    def target_layout(
        self,
        *,
        tp_size: int,
        tp_rank: int,
        pp_size: int,
        pp_rank: int,
        global_rank: int,
        ep_size: int = 1,
        ep_rank: int = 0,
    ) -> TargetLayout:
        """This rank's TP and EP position as the engine reports it; under PP, ``tp_rank`` and
        ``global_rank`` differ and only ``tp_rank`` (and ``ep_rank``) place the slice."""
        return TargetLayout(tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank)

    def make_receiver(self, model: torch.nn.Module, **kwargs: Any) -> RefitReceiver:
        """A :attr:`receiver_class` for ``model``; ``kwargs`` are its keyword arguments."""
        kwargs.setdefault("backend", self.backend)
        return self.receiver_class(model, **kwargs)


def reference_adapter() -> ReferenceAdapter:
    """The reference adapter on the CPU mock backend (what CPU CI checks)."""
    return ReferenceAdapter(CpuMockBackend())


def cuda_reference_adapter() -> ReferenceAdapter:
    """The reference adapter on CUDA (``tox -e gpu``)."""
    return ReferenceAdapter(CudaBackend())
