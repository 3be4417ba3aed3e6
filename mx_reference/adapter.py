"""The engine adapter protocol: what an inference engine worker provides to mx-harness.

An adapter (vLLM, SGLang, TensorRT-LLM, Dynamo, ModelExpress integration...) wraps one engine
worker. The conformance suite (``mx_sim.conformance``) drives an adapter through this protocol
and compares what it does with the reference behaviour. Declared capabilities gate the checks
that need them: a check whose capability is not declared is skipped with a reason, never
silently passed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from mx_reference.backends import AcceleratorBackend

# Capabilities an adapter may declare.
MOE = "moe"  # expert-parallel MoE models (fused / stacked experts)
FP8 = "fp8"  # post-load processing that creates tensors (FP8 scales) during load
MIXED_TP = "mixed_tp"  # trainer and inference tensor-parallel sizes may differ
PIPELINE_PARALLEL = "pipeline_parallel"  # inference pipeline parallelism (tp rank != global rank)
TIED_EMBEDDINGS = "tied_embeddings"  # models whose lm_head shares the embedding
CUDA_GRAPHS = "cuda_graphs"  # graph capture and replay (CUDA, or the CPU-simulated graph)
SHARED_IPC = "shared_ipc"  # zero-copy tensor channel (shared memory / CUDA IPC)
CAPABILITIES = frozenset(
    {MOE, FP8, MIXED_TP, PIPELINE_PARALLEL, TIED_EMBEDDINGS, CUDA_GRAPHS, SHARED_IPC}
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

    def build_model(self, kind: str, *, seed: int = 0, **config: Any) -> torch.nn.Module:
        """Build (or wrap) the engine's model for a tiny config of model family ``kind``."""
        ...

    def discover_tensors(
        self, model: torch.nn.Module, backend: AcceleratorBackend | None = None
    ) -> Any:
        """Every publishable tensor of ``model`` under ``backend`` (default: the adapter's)."""
        ...

    def load_weights(
        self, model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> None:
        """Copy HF-named tensors into ``model`` in place; all or nothing."""
        ...

    def pause(self) -> None:
        """Stop scheduling inference so weights can be swapped."""
        ...

    def resume(self) -> None: ...

    @property
    def paused(self) -> bool: ...

    def capture_graph(
        self,
        key: Any,
        forward_fn: Callable[..., Any],
        inputs: Mapping[str, Any],
        postprocess_fn: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> Any:
        """Warm up and capture ``forward_fn`` for ``key`` (postprocess after each run)."""
        ...

    def replay_graph(self, key: Any, inputs: Mapping[str, Any]) -> Any: ...

    def make_codec(self) -> Any:
        """The IPC codec the engine's processes exchange messages with."""
        ...

    def make_channel(self, kind: str, **options: Any) -> Any:
        """An IPC buffer channel (``inline`` or ``shared``)."""
        ...

    def make_request_tracker(self) -> Any:
        """The request-scoped bookkeeping (buffered tensors per request, ``abort``)."""
        ...

    def target_layout(
        self, *, tp_size: int, tp_rank: int, pp_size: int, pp_rank: int, global_rank: int
    ) -> Any:
        """The engine's own refit target layout, as the engine reports it."""
        ...

    def make_receiver(self, model: torch.nn.Module, **kwargs: Any) -> Any:
        """A refit receiver applying pulled weights into ``model``."""
        ...
