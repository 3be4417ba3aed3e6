"""Sharded reference adapters: engines whose ranks hold only their shard.

Two engines share one loader (:class:`ShardedReferenceAdapter`): the vLLM-shaped one here,
and transformers' own TP engine (:mod:`~mx_sim.conformance.hf_tp_adapter`), whose layout is
read off DTensor placements and whose ranks are processes.

Each rank of :class:`VllmShapedAdapter` holds what a vLLM TP rank holds, as plain tensors:
``qkv_proj`` fusing this rank's q heads with its k and v heads (one KV head repeated over
``T / G`` ranks when TP exceeds the KV heads: rank r holds head ``r // (T / G)``),
``gate_up_proj`` fusing its gate and up rows, o_proj and down_proj columns, vocab rows of the
embedding and lm_head (the vocab padded to a multiple of 64, then split evenly, as vLLM's
``VocabParallelEmbedding`` does: the last ranks' rows end in :class:`Padding`), whole norms. It has no DTensors, so it declares
that layout (:func:`vllm_layout`), the way an adapter over vLLM's ``ColumnParallelLinear``,
``QKVParallelLinear``, ``MergedColumnParallelLinear``, ``RowParallelLinear`` and
``VocabParallelEmbedding`` would; its loader is
:class:`~mx_reference.refit.shards.ShardedRefitReceiver` over those tensors.

Its ranks run as threads of one process. :func:`cut` and :func:`expected_shards` are the
suite's own cut of a version's full weights, the oracle of both engines' shards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mx_reference import adapter as caps
from mx_reference.refit.apply import model_parameters
from mx_reference.refit.layouts import hf_meta
from mx_reference.refit.shards import (
    LayoutPart,
    Padding,
    ShardedRefitReceiver,
    SlicePart,
    chunk_range,
)
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend

PROJ = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj")
VLLM_VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE


@dataclass
class ShardedModel:
    """One rank of a sharded engine (:class:`mx_reference.adapter.ShardedEngine`)."""

    model: torch.nn.Module  # the full model on the meta device: config and HF names only
    local: dict[str, torch.Tensor]
    layout: dict[str, tuple[LayoutPart, ...]]
    meta: dict[str, torch.Tensor]
    tp_size: int
    tp_rank: int
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # input ids -> logits


def kv_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """KV heads ``[lo, hi)`` of a rank: its share of them, or the one it repeats (T > G)."""
    if num_kv_heads >= tp_size:
        return chunk_range(num_kv_heads, tp_size, tp_rank)
    head = tp_rank // (tp_size // num_kv_heads)
    return head, head + 1


def padded_vocab_parts(vocab: int, name: str, tp_size: int, tp_rank: int) -> tuple[LayoutPart, ...]:
    """A rank's vocab rows as vLLM holds them: the vocab padded to a multiple of
    :data:`VLLM_VOCAB_PADDING`, ``padded / tp_size`` rows a rank, the rows past the real
    vocab padding (at vocab 300, TP 2: rows [0, 160), then [160, 300) and 20 padding rows)."""
    padded = -(-vocab // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    per_rank = -(-padded // tp_size)
    lo = min(tp_rank * per_rank, vocab)
    hi = min(lo + per_rank, vocab)
    real = (SlicePart(name, 0, lo, hi),) if hi > lo else ()
    return real + ((Padding(0, per_rank - (hi - lo)),) if hi - lo < per_rank else ())


def vllm_layout(
    meta: Mapping[str, torch.Tensor], config: Any, tp_size: int, tp_rank: int
) -> dict[str, tuple[LayoutPart, ...]]:
    """vLLM's per-rank layout of an HF Llama-style model, as declared slices."""
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layout: dict[str, tuple[LayoutPart, ...]] = {}
    for name, t in meta.items():
        prefix, _, leaf = name.rpartition(".")
        module = prefix.rpartition(".")[2]
        rows = t.shape[0]
        if module == "q_proj":
            base = prefix.removesuffix("q_proj")
            q = [h * head_dim for h in chunk_range(heads, tp_size, tp_rank)]
            kv = [h * head_dim for h in kv_heads(groups, tp_size, tp_rank)]
            layout[f"{base}qkv_proj.{leaf}"] = (
                SlicePart(name, 0, *q),
                SlicePart(f"{base}k_proj.{leaf}", 0, *kv),
                SlicePart(f"{base}v_proj.{leaf}", 0, *kv),
            )
        elif module == "gate_proj":
            base = prefix.removesuffix("gate_proj")
            lo, hi = chunk_range(rows, tp_size, tp_rank)
            layout[f"{base}gate_up_proj.{leaf}"] = (
                SlicePart(name, 0, lo, hi),
                SlicePart(f"{base}up_proj.{leaf}", 0, lo, hi),
            )
        elif module in ("o_proj", "down_proj") and leaf == "weight":
            layout[name] = (SlicePart(name, 1, *chunk_range(t.shape[1], tp_size, tp_rank)),)
        elif module in ("embed_tokens", "lm_head"):
            layout[name] = padded_vocab_parts(rows, name, tp_size, tp_rank)
        elif module not in PROJ:
            layout[name] = (SlicePart(name, 0, 0, rows),)  # norms: whole
    return layout


def cut(full: Mapping[str, torch.Tensor], parts: Sequence[LayoutPart]) -> torch.Tensor:
    """A local tensor of a declared layout, cut from full HF tensors (the suite's own cut);
    padding rows are zero, as vLLM keeps them."""
    template = next(full[p.hf_name] for p in parts if isinstance(p, SlicePart))
    blocks = []
    for p in parts:
        if isinstance(p, SlicePart):
            blocks.append(full[p.hf_name].narrow(p.dim, p.start, p.stop - p.start))
        else:
            shape = list(template.shape)
            shape[p.dim] = p.rows
            blocks.append(template.new_zeros(shape))
    return torch.cat(blocks, parts[0].dim)


def expected_shards(
    model: torch.nn.Module,
    layout: Mapping[str, Sequence[LayoutPart]],
    full: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Each local tensor of a rank as the suite cuts it from a version's full HF weights:
    torch's own ``distribute_tensor`` (no communication) where the engine's parameter is a
    DTensor, so its layout reading is not the oracle; the declared slices otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    out = {}
    for name, parts in layout.items():
        p = params.get(name)
        if isinstance(p, DTensor):
            dt = distribute_tensor(full[name], p.device_mesh, p.placements, src_data_rank=None)
            out[name] = dt.to_local()
        else:
            out[name] = cut(full, parts)
    return out


class ShardedReferenceAdapter(ReferenceAdapter):
    """The reference adapter plus :data:`~mx_reference.adapter.SHARDED`: the loader of a
    sharded engine is :class:`~mx_reference.refit.shards.ShardedRefitReceiver` over the rank's
    local tensors and layout. Subclasses build the engine; conformance mutants of a sharded
    loader override :meth:`loader_layout`."""

    ranks_as_processes = False  # ranks may be threads of one process

    @property
    def capabilities(self) -> frozenset[str]:
        return caps.CAPABILITIES

    def loader_layout(self, engine: ShardedModel) -> dict[str, tuple[LayoutPart, ...]]:
        """The layout the loader writes by: the engine's own."""
        return engine.layout

    def make_sharded_receiver(self, engine: ShardedModel, **kwargs: Any) -> ShardedRefitReceiver:
        kwargs.setdefault("backend", self.backend)
        layout = self.loader_layout(engine)
        local = {n: engine.local[n] for n in layout}
        return ShardedRefitReceiver(
            engine.model, layout=layout, local=local, meta=engine.meta, **kwargs
        )


class VllmShapedAdapter(ShardedReferenceAdapter):
    """A vLLM-shaped sharded engine (:func:`vllm_layout`), with no forward of its own."""

    families = ("llama", "qwen2", "qwen3")  # the dense families vllm_layout fuses

    def build_sharded(
        self, kind: str, *, tp_size: int, tp_rank: int, seed: int = 0, **config: Any
    ) -> ShardedModel:
        return vllm_shard(self.build_model(kind, seed=seed, **config), tp_size, tp_rank)


def vllm_shard(full: torch.nn.Module, tp_size: int, tp_rank: int) -> ShardedModel:
    """Rank ``tp_rank`` of a vLLM-shaped engine holding ``full``'s weights: its local tensors
    cut by :func:`vllm_layout`; ``full`` moves to the meta device, freeing its memory."""
    meta = hf_meta(full)
    params = {n: p.detach() for n, p in model_parameters(full).items()}
    layout = vllm_layout({n: meta[n] for n in params}, full.config, tp_size, tp_rank)
    local = {n: cut(params, parts).clone() for n, parts in layout.items()}
    return ShardedModel(full.to("meta"), local, layout, meta, tp_size, tp_rank)


def vllm_shaped_adapter() -> VllmShapedAdapter:
    """The sharded reference adapter on the CPU mock backend."""
    return VllmShapedAdapter(CpuMockBackend())
