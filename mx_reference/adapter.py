"""The engine adapter protocol: what an inference engine worker provides to mx-harness.

An adapter (vLLM, SGLang, TensorRT-LLM, Dynamo, ModelExpress integration...) wraps one engine
worker. The conformance suite (``mx_sim.conformance``) drives an adapter through this protocol
and compares what it does with the reference behaviour. Declared capabilities gate the checks
that need them: a check whose capability is not declared is skipped with a reason, never
silently passed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

from mx_reference.backends import AcceleratorBackend
from mx_reference.discovery import PublishedTensor
from mx_reference.ipc.codec import TensorSink, TensorSource

# Capabilities an adapter may declare.
MOE = "moe"  # expert-parallel MoE models (fused / stacked experts)
FP8 = "fp8"  # post-load processing that creates tensors (FP8 scales) during load
MIXED_TP = "mixed_tp"  # trainer and inference tensor-parallel sizes may differ
PIPELINE_PARALLEL = "pipeline_parallel"  # inference pipeline parallelism (tp rank != global rank)
TIED_EMBEDDINGS = "tied_embeddings"  # models whose lm_head shares the embedding
CUDA_GRAPHS = "cuda_graphs"  # graph capture and replay (CUDA, or the CPU-simulated graph)
SHARED_IPC = "shared_ipc"  # zero-copy tensor channel (shared memory / CUDA IPC)
SHARDED = "sharded"  # ranks hold only their shard; refit writes it in place (build_sharded)
CAPABILITIES = frozenset(
    {MOE, FP8, MIXED_TP, PIPELINE_PARALLEL, TIED_EMBEDDINGS, CUDA_GRAPHS, SHARED_IPC, SHARDED}
)


@runtime_checkable
class EngineAdapter(Protocol):
    """What one engine worker provides.

    Weights cross this boundary in HF naming and HF layout; the engine's own fused or sharded
    layout is the adapter's business. ``load_weights`` must update tensors in place (storage
    addresses unchanged) so captured graphs stay valid.
    """

    @property
    def backend(self) -> AcceleratorBackend:
        """The accelerator backend the engine's tensors live on."""
        ...

    @property
    def capabilities(self) -> frozenset[str]:
        """A subset of :data:`CAPABILITIES`."""
        ...

    @property
    def families(self) -> tuple[str, ...]:
        """The model families (HF ``model_type`` s of the suite's tiny models: ``llama``,
        ``qwen3_moe``, ``deepseek_v3``...) :meth:`build_model` builds; the suite refits
        each."""
        ...

    def build_model(self, kind: str, *, seed: int = 0, **config: Any) -> torch.nn.Module:
        """Build (or wrap) the engine's model for a tiny config of model family ``kind``."""
        ...

    def post_load(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], None]) -> None:
        """Run the engine's post-load processing ``fn(model)`` (e.g. FP8 scale creation).

        A bare accelerator-tensor assignment ``fn`` makes on a submodule (``layer.scale = t``)
        must be published under that qualified name, as
        :func:`mx_reference.discovery.capture_tensor_attrs` does.
        """
        ...

    def finalize(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], None]) -> None:
        """Run a model-specific finalizer ``fn(model)``, the engine's second capture site
        (vLLM's MLA ``process_weights_after_loading`` builds ``W_UV`` and ``W_UK_T``): as in
        :meth:`post_load`, a bare accelerator-tensor assignment on a submodule is published
        under that qualified name."""
        ...

    def discover_tensors(
        self, model: torch.nn.Module, backend: AcceleratorBackend | None = None
    ) -> list[PublishedTensor]:
        """The published set of ``model`` under ``backend`` (default: the adapter's).

        Like :func:`mx_reference.discovery.discover`: entries are contiguous tensors sharing
        the module's memory that cover every byte of every tensor ``backend.is_accel_tensor``
        accepts (parameters, buffers, hidden tensors) exactly once; every module tensor name is
        an entry name or alias; nothing ``backend`` rejects; the same names in the same order
        for two identical builds.
        """
        ...

    def load_weights(
        self, model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> None:
        """Copy HF-named tensors into ``model`` in place (``param.data.copy_``; storage
        addresses unchanged); all or nothing.

        A tensor with a wrong shape or dtype, or a name the model has no parameter for, raises
        ``ValueError`` naming that tensor before any byte is written.
        """
        ...

    def inference(self) -> AbstractContextManager[None]:
        """The engine's scheduler admitting one forward pass: it runs inside
        ``with adapter.inference():``, which waits while the engine is paused."""
        ...

    def pause(self) -> None:
        """Stop scheduling inference so weights can be swapped: returns only once no forward
        is running (every ``inference()`` block entered before has exited), and admits none
        until :meth:`resume`. (:class:`mx_reference.refit.poller.EngineGate` does this.)"""
        ...

    def resume(self) -> None:
        """Admit forwards again."""
        ...

    @property
    def paused(self) -> bool:
        """True from the return of :meth:`pause` until :meth:`resume`."""
        ...

    def capture_graph(
        self,
        key: Any,
        forward_fn: Callable[..., Any],
        inputs: Mapping[str, Any],
        postprocess_fn: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> Any:
        """Warm up and capture ``forward_fn(inputs)`` under ``key``; returns the output
        object every replay overwrites.

        ``postprocess_fn(inputs)`` undoes the in-place writes of each warmup run (and of the
        capture, where capturing runs the forward: a CUDA capture only records it), so inputs
        ``forward_fn`` mutates in place are the same after capture as before it.
        """
        ...

    def replay_graph(self, key: Any, inputs: Mapping[str, Any]) -> Any:
        """Replay ``key`` and return its captured output object, rewritten.

        Reads inputs where the capture read them: write new values in place. A graph's first
        replay at least rejects inputs that moved to other memory with
        :class:`mx_reference.graphs.InputAddressError` naming their paths, before replaying.
        """
        ...

    def make_codec(self, channel: tuple[TensorSink, TensorSource] | None = None) -> tuple[Any, Any]:
        """``(encoder, decoder)`` over ``channel`` (a :meth:`make_channel` pair; default inline).

        ``encoder.encode(obj) -> list[frames]`` and ``decoder.decode(frames) -> obj`` must round
        trip nested containers of tensors bit-exactly (every non-quantized dtype, empty and
        non-contiguous tensors) and raise :class:`mx_reference.ipc.DecodeError` for any
        malformed frames.
        """
        ...

    def make_channel(self, kind: str, **options: Any) -> tuple[TensorSink, TensorSource]:
        """``(sink, source)`` ends of an IPC buffer channel, ``kind`` ``inline`` or ``shared``.

        ``shared`` takes :class:`mx_reference.ipc.SharedChannelConfig` fields as ``options``,
        and ``producers`` (default 1): how many producer slots the consumer end serves (see
        :meth:`attach_producer`; the returned sink is slot 0). Its sink counts ``sent``
        tensors and ``fallbacks`` by reason and works with
        :func:`mx_reference.ipc.request_scope`; its source checks dtype and shape on arrival
        (:class:`~mx_reference.ipc.DecodeError`) and has ``poll()`` and ``abort(request_ids)``.
        """
        ...

    def attach_producer(self, channel: tuple[TensorSink, TensorSource], slot: int) -> TensorSink:
        """A new producer on the consumer end of a ``shared`` channel, at producer ``slot``:
        another API server, or, at a slot already used, a restarted incarnation of that
        producer. Its tensors reach the same source, and its messages decode however far
        the previous incarnation's message ids had gone."""
        ...

    def make_request_tracker(self, ttl_s: float = 60.0) -> Any:
        """Request-scoped bookkeeping with the :class:`mx_reference.ipc.TensorBuffer` API:
        ``add(key, tensor, request_id)``, ``len()`` (tensors buffered), and
        ``abort(request_ids)`` taking one ``str`` id or a collection of ids and returning how
        many tensors it freed. Aborting drops the tracker's references at once: an aborted
        tensor's memory is not held until the TTL."""
        ...

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
    ) -> Any:
        """This rank's refit target layout (a :class:`mx_reference.refit.TargetLayout`), as
        the engine reports it: its TP position is ``tp_rank`` and its expert-parallel position
        ``ep_rank`` of ``ep_size`` (which experts it holds), neither derived from
        ``global_rank`` (under pipeline parallelism, or with any rank offset, they differ)."""
        ...

    def make_receiver(self, model: torch.nn.Module, **kwargs: Any) -> Any:
        """A refit receiver applying pulled weights into ``model``.

        ``kwargs`` are :class:`mx_reference.refit.receiver.RefitReceiver`'s keyword arguments
        (``transport``, ``registry``, ``config``, ``target``, ``model_config``, ``group``...).
        The receiver's ``refit(version)`` applies that version in place, all or nothing (a
        failed cycle raises with a message and leaves the model unchanged), and returns the
        cycle's timing (``registrations``, ``bytes_allocated``, ``bytes_pulled``: zero setup on
        a warm cycle with an unchanged layout); ``close()`` releases its buffers. Bytes that
        differ from the published ones (corrupted in flight) fail the cycle. A version is
        applied only once every trainer rank has published it (never a mix of two). A version from
        trainers at another layout than the last one (a restarted trainer job) still applies.
        The ranks of a replica (given one ``group``) apply a version together or not at all:
        a failure on one rank fails the cycle on every rank, within the receiver's timeout.
        """
        ...


class ShardedEngine(Protocol):
    """One rank of a sharded engine, as :meth:`ShardedEngineAdapter.build_sharded` returns it.

    ``local``: the tensors this rank holds, by the engine's own names (vLLM's fused
    ``qkv_proj``, ``gate_up_proj``...). ``layout``: for each, the
    :class:`~mx_reference.refit.shards.SlicePart` s of full HF parameters it is made of, and
    :class:`~mx_reference.refit.shards.Padding` for rows of the engine's own (vLLM's padded
    vocab), concatenated along their dim (DTensor engines read it off their placements with
    :func:`~mx_reference.refit.shards.dtensor_layout`); refit writes every sliced row and no
    padding row. ``meta``: the full HF parameters as
    meta tensors. ``model``: the module, for its HF config (and its DTensor parameters, if
    any: the suite cuts those with torch's ``distribute_tensor``). ``forward``: the engine's own
    forward, input ids ``(batch, seq)`` -> logits ``(batch, seq, vocab)`` over the full vocab
    (its TP collectives included), or ``None`` for an engine that runs no forward in the suite;
    when given, the suite checks it against the trainer's logits."""

    model: torch.nn.Module
    local: dict[str, torch.Tensor]
    layout: dict[str, Any]
    meta: dict[str, torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor] | None


class ShardedEngineAdapter(EngineAdapter, Protocol):
    """An engine whose ranks hold only their shard (capability :data:`SHARDED`).

    ``ranks_as_processes``: ``False`` when a replica's ranks may be threads of one process
    (each given a gloo group member); ``True`` when each rank needs the replica as its own
    process's default process group (transformers' TP builds its device mesh over the world):
    the suite then runs one process per rank, with ``torch.distributed`` initialized
    (gloo, world = the replica) before :meth:`build_sharded`, and sends the adapter to each
    (it must pickle)."""

    ranks_as_processes: bool

    def build_sharded(
        self, kind: str, *, tp_size: int, tp_rank: int, seed: int = 0, **config: Any
    ) -> ShardedEngine:
        """Rank ``tp_rank`` of a ``tp_size``-way sharded ``kind`` model with ``seed``'s
        weights."""
        ...

    def make_sharded_receiver(self, engine: ShardedEngine, **kwargs: Any) -> Any:
        """The engine's own loader for ``engine``: a receiver (same contract and keywords as
        :meth:`EngineAdapter.make_receiver`, ``group`` the replica) that writes exactly this
        rank's shard in place."""
        ...
