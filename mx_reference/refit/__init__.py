"""Refit: trainer ranks publish weight versions, inference workers take them in place.

The parts, in the order a weight travels (each module is one concern):

* :mod:`~mx_reference.refit.publisher`: ``RefitPublisher`` copies a trainer rank's shards into
  a registered arena and publishes a manifest per version.
* :mod:`~mx_reference.refit.registry`: ``VersionRegistry``, versions committed over a
  torch.distributed Store.
* :mod:`~mx_reference.refit.planner`: ``plan_refit`` / ``PlanCache``, which rows of which
  source shard land where (coverage proven before any byte moves).
* :mod:`~mx_reference.refit.receiver`: ``RefitReceiver``, one cycle (discover, plan, pull,
  translate, verify, apply) into a live model.
* :mod:`~mx_reference.refit.shards`: ``ShardedRefitReceiver``, the same cycle into an engine
  whose ranks hold only their shard (layout from DTensor placements or declared slices).
* :mod:`~mx_reference.refit.wire`: descriptors, manifests, endpoint, digest, alignment.
* :mod:`~mx_reference.refit.layouts` and :mod:`~mx_reference.refit.name_maps`: Megatron <-> HF.
* :mod:`~mx_reference.refit.apply`: the atomic in-place apply.
* :mod:`~mx_reference.refit.poller` and :mod:`~mx_reference.refit.replicas`: background polling
  while the engine pauses, and replica fan-out.
"""

from mx_reference.refit.layouts import megatron_shards_from_hf
from mx_reference.refit.name_maps import RefitModelConfig
from mx_reference.refit.planner import PlanCache, RefitPlan, TargetLayout, plan_refit
from mx_reference.refit.publisher import PublisherConfig, RefitPublisher
from mx_reference.refit.receiver import (
    CycleTiming,
    ReceiverConfig,
    RefitError,
    RefitReceiver,
    StaleVersion,
)
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.wire import ShardDescriptor, SourceManifest

__all__ = [
    "RefitPublisher",
    "PublisherConfig",
    "RefitReceiver",
    "ReceiverConfig",
    "CycleTiming",
    "RefitError",
    "StaleVersion",
    "VersionRegistry",
    "plan_refit",
    "PlanCache",
    "RefitPlan",
    "TargetLayout",
    "RefitModelConfig",
    "megatron_shards_from_hf",
    "ShardDescriptor",
    "SourceManifest",
]
