"""Planning-only mode for topologies too large to run (e.g. 256 trainer ranks).

Every rank is a thread and the registry a ``HashStore``; no byte moves. Trainer ranks
(:class:`~mx_sim.refit.ranks.TrainerRank` without a transport) publish real manifests, and each
receiver rank discovers the version, plans its slices and proves coverage (fail closed).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch.distributed as dist

from mx_reference.refit.planner import TargetLayout, plan_refit
from mx_reference.refit.registry import VersionRegistry
from mx_sim.cluster.topology import TopologySpec
from mx_sim.fixtures import TinyModelSpec, VersionWeights
from mx_sim.refit.ranks import MODEL_ID, HfSplitShards, TrainerRank


def plan_topology(
    spec: TopologySpec,
    model_kind: str = "llama",
    model_spec: TinyModelSpec | None = None,
    *,
    threads: int = 8,
) -> dict[str, Any]:
    """Publish version 1 from every trainer rank and plan every receiver rank.

    Returns counts and, per receiver rank, the bytes its plan would pull; an incomplete plan
    raises :class:`~mx_reference.refit.planner.IncompleteRefitPlan`.
    """
    weights = VersionWeights(model_kind, model_spec or TinyModelSpec())
    weights.model(1)  # built (and cached) in this thread: transformers' lazy imports race
    registry = VersionRegistry(dist.HashStore(), timeout=30.0)

    def trainer(rank: int) -> None:
        info = spec.rank_info(rank)
        TrainerRank(info, registry, None, HfSplitShards(weights, info)).publish(1)

    def receiver(rank: int) -> int:
        info = spec.rank_info(rank)
        version = registry.wait_for_version(MODEL_ID, 1)
        plan = plan_refit(
            registry.manifests(MODEL_ID, version),
            TargetLayout(tp_size=info.tp_size, tp_rank=info.tp_rank),
        ).require_complete()
        return sum(t.nbytes for t in plan.tensors.values())

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(trainer, range(spec.num_trainers)))
        pulled = list(pool.map(receiver, range(spec.num_trainers, spec.world_size)))
    return {
        "trainers": spec.num_trainers,
        "receivers": spec.num_receivers,
        "bytes_per_receiver": pulled,
        "seconds": time.perf_counter() - start,
    }
