"""A Megatron-Core trainer rank's own parameters -> the shards it publishes.

A Megatron rank holds its tensor-parallel shard of every weight as a parameter of its
``GPTModel`` (one pipeline stage of it). :func:`shards_from_megatron` maps that rank's
``named_parameters()`` onto :class:`~mx_reference.refit.wire.ShardDescriptor` s, reading each
shard's range off the rank's TP position, so the bytes published are Megatron's own (no HF
state dict is cut). Needs nothing from Megatron itself: the mapping is names and shapes.

* **Names.** Both fused-norm schemes are accepted: the local layer spec's
  ``input_layernorm`` / ``pre_mlp_layernorm`` and Transformer Engine's
  ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` (the canonical names of
  :mod:`~mx_reference.refit.name_maps`; a MoE layer's ``pre_mlp_layernorm`` and MLA's
  ``input_layernorm`` keep their names). MLA's latent norms are the local spec's
  ``self_attention.q_layernorm`` / ``kv_layernorm`` or Transformer Engine's
  ``linear_q_up_proj.layer_norm_weight`` / ``linear_kv_up_proj.layer_norm_weight``.
  Layer numbers are local to a pipeline stage; ``layer_offset`` makes them global.
* **Vocab.** Megatron's embedding and output layer hold padded vocab rows (rank r of T holds
  rows ``[r, r + 1) * padded / T``, padding included); only the real rows are published.
* **Ties.** With tied embeddings the last stage's ``output_layer.weight`` is a copy of the
  embedding, not a weight of its own: it is not published.

A parameter the family's name map does not know, or whose local shape is not the shard its
rank must hold, is a ``ValueError`` naming it, raised before anything is published.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec
import torch

from mx_reference.refit.layouts import expert_range, padded_vocab_size, rank_segments, vocab_range
from mx_reference.refit.name_maps import RefitModelConfig, TensorRule, tensor_rules
from mx_reference.refit.wire import EXPERT_STYLES, ShardDescriptor, dtype_name

# local layer spec suffix -> the Transformer Engine (canonical) suffix, in dense layers
LOCAL_SPEC_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
# the local spec's separate MLA latent norms -> their Transformer Engine (canonical) names
LOCAL_SPEC_MLA_NORMS = {
    "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
    "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_LOCAL_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.+)")


def canonical_name(
    name: str, cfg: RefitModelConfig, layer_offset: int = 0, expert_offset: int = 0
) -> str:
    """The name-map name of Megatron parameter ``name`` of a stage starting at layer
    ``layer_offset``, on an EP rank whose first expert is ``expert_offset``."""
    m = _LAYER.fullmatch(name)
    if m is None:
        return name
    layer, rest = int(m[1]) + layer_offset, m[2]
    if cfg.mla and rest in LOCAL_SPEC_MLA_NORMS:
        rest = LOCAL_SPEC_MLA_NORMS[rest]
    elif rest in LOCAL_SPEC_NORMS and not _unfused_norm(rest, layer, cfg):
        rest = LOCAL_SPEC_NORMS[rest]
    expert = _LOCAL_EXPERT.fullmatch(rest)
    if expert is not None:  # Megatron numbers an EP rank's experts from 0
        rest = f"mlp.experts.local_experts.{int(expert[1]) + expert_offset}.{expert[2]}"
    return f"decoder.layers.{layer}.{rest}"


def _unfused_norm(rest: str, layer: int, cfg: RefitModelConfig) -> bool:
    """A norm Transformer Engine's spec keeps as its own module too: an MoE layer's
    ``pre_mlp_layernorm``, MLA's ``input_layernorm`` (no ``linear_qkv`` to fuse it into)."""
    if rest.startswith("pre_mlp"):
        return cfg.moe_layer(layer)
    return cfg.mla


def shards_from_megatron(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    cfg: RefitModelConfig,
    *,
    tp: tuple[int, int],
    ep: tuple[int, int] = (0, 1),
    layer_offset: int = 0,
) -> list[tuple[ShardDescriptor, torch.Tensor]]:
    """``(descriptor, shard)`` of every parameter of a Megatron rank at ``tp`` and ``ep``
    ``(rank, size)``; the shards are views of the parameters (detached). MoE layers are the
    local spec's: one ``local_experts.{i}`` module per expert of this EP rank."""
    e_lo = expert_range(cfg.num_experts, ep[1], ep[0])[0] if cfg.num_experts else 0
    rules = {r.megatron: r for r in tensor_rules(cfg)}
    out = []
    for name, param in named_parameters:
        canon = canonical_name(name, cfg, layer_offset, e_lo)
        if cfg.tie_word_embeddings and canon == "output_layer.weight":
            continue  # the last stage's copy of the tied embedding
        rule = rules.get(canon)
        if rule is None:
            raise ValueError(
                f"Megatron parameter {name!r} (as {canon!r}): no descriptor mapping in the "
                f"{cfg.family!r} name map"
            )
        shard = _describe(name, rule, param.detach(), cfg, tp)
        if shard is not None:
            out.append(shard)
    return out


def _describe(
    name: str, rule: TensorRule, local: torch.Tensor, cfg: RefitModelConfig, tp: tuple[int, int]
) -> tuple[ShardDescriptor, torch.Tensor] | None:
    rank, size = tp
    shape = list(local.shape)
    if rule.style == "vocab_parallel":
        padded = padded_vocab_size(cfg.vocab_size, size, cfg.vocab_divisible_by)
        if shape[0] * size != padded:
            raise ValueError(
                f"Megatron parameter {name!r}: {shape[0]} vocab rows per rank, but vocab "
                f"{cfg.vocab_size} pads to {padded} at TP {size} (divisible by "
                f"{cfg.vocab_divisible_by})"
            )
        lo, hi = vocab_range(cfg.vocab_size, size, rank, cfg.vocab_divisible_by)
        if hi == lo:
            return None  # this rank holds padding only
        local, shape[0] = local[: hi - lo], cfg.vocab_size
    elif rule.style != "replicated":
        shape[rule.axis] *= size
    qkv = rule.style == "qkv_column"
    # the fused tensors' global extents follow from the config: where layout bugs live
    fused = {
        "qkv_column": (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
        "gated_mlp_column": 2 * cfg.intermediate_size,
    }
    # (an MoE model's dense layers and shared experts have widths the config does not hold)
    check = rule.style in fused and not (rule.style == "gated_mlp_column" and cfg.num_experts)
    if check and shape[rule.axis] != fused[rule.style]:
        raise ValueError(
            f"Megatron parameter {name!r}: local shape {tuple(local.shape)} makes "
            f"{shape[rule.axis]} global rows at TP {size}, the config needs {fused[rule.style]}"
        )
    whole = ShardDescriptor(
        name=rule.megatron,
        global_shape=tuple(shape),
        dtype=dtype_name(local.dtype),
        style=rule.style,
        shard_axis=rule.axis,
        num_heads=cfg.num_heads if qkv else 0,
        num_kv_heads=cfg.num_kv_heads if qkv else 0,
        expert_ids=() if rule.expert is None else (rule.expert,),
        num_experts=cfg.num_experts if rule.style in EXPERT_STYLES else 0,
        nbytes=local.element_size() * torch.Size(shape).numel(),
    )
    if rule.style == "replicated":
        desc = msgspec.structs.replace(whole, nbytes=local.numel() * local.element_size())
    else:
        segments = rank_segments(whole, size, rank, vocab_divisible_by=cfg.vocab_divisible_by)
        desc = msgspec.structs.replace(
            whole,
            placement="shard",
            shard_range=segments[0],  # a gated [gate; up] range is along each half
            nbytes=local.numel() * local.element_size(),
        )
    if desc.local_shape != tuple(local.shape):
        raise ValueError(
            f"Megatron parameter {name!r}: local shape {tuple(local.shape)} is not the shard "
            f"{desc.local_shape} that TP rank {rank} of {size} holds"
        )
    return desc, local
