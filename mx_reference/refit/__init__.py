"""Refit: trainer ranks -> inference workers.

Module split (the data plane, in ``publisher``/``receiver``/``poller``, builds on these):

* :mod:`~mx_reference.refit.descriptors`: the wire format. ``ShardDescriptor`` and
  ``SourceManifest`` (versioned msgspec schema, msgpack, never pickle), ``encode_manifest`` /
  ``decode_manifest``, ``layout_signature``, ``name_digest``.
* :mod:`~mx_reference.refit.layouts`: Megatron <-> HF translation (QKV interleave, gated MLP,
  vocab padding, tied embeddings, MoE ids, name maps), the trainer-side
  ``megatron_shards_from_hf`` and the receiver-side ``canonical_from_ranks`` /
  ``hf_from_canonical``.
* :mod:`~mx_reference.refit.planner`: ``TargetLayout``, ``plan_refit`` -> ``RefitPlan`` (pieces
  per tensor, coverage proven, fail closed), ``assemble`` (pure-torch reference), ``PlanCache``.
* :mod:`~mx_reference.refit.registry`: ``VersionRegistry`` over a torch.distributed Store.
"""

from mx_reference.refit.descriptors import (
    ROLES,
    SCHEMA_VERSION,
    ShardDescriptor,
    SourceManifest,
    decode_manifest,
    encode_manifest,
    layout_signature,
    make_manifest,
    name_digest,
)
from mx_reference.refit.layouts import (
    RefitModelConfig,
    canonical_from_ranks,
    expert_range,
    global_expert_id,
    hf_from_canonical,
    hf_gate_up_from_megatron,
    hf_qkv_from_megatron,
    megatron_fc1_shards_from_hf,
    megatron_name_map,
    megatron_qkv_from_hf,
    megatron_shards_from_hf,
    padded_vocab_size,
    tp_range,
    vocab_range,
)
from mx_reference.refit.planner import (
    IncompleteRefitPlan,
    Piece,
    PlanCache,
    RefitPlan,
    TargetLayout,
    TensorPlan,
    assemble,
    coalesce,
    plan_refit,
)
from mx_reference.refit.registry import VersionRegistry

__all__ = [
    "VersionRegistry",
    "IncompleteRefitPlan",
    "Piece",
    "PlanCache",
    "RefitPlan",
    "TargetLayout",
    "TensorPlan",
    "assemble",
    "coalesce",
    "plan_refit",
    "ROLES",
    "SCHEMA_VERSION",
    "RefitModelConfig",
    "ShardDescriptor",
    "SourceManifest",
    "canonical_from_ranks",
    "decode_manifest",
    "encode_manifest",
    "expert_range",
    "global_expert_id",
    "hf_from_canonical",
    "hf_gate_up_from_megatron",
    "hf_qkv_from_megatron",
    "layout_signature",
    "make_manifest",
    "megatron_fc1_shards_from_hf",
    "megatron_name_map",
    "megatron_qkv_from_hf",
    "megatron_shards_from_hf",
    "name_digest",
    "padded_vocab_size",
    "tp_range",
    "vocab_range",
]
