"""One-process refit rig: trainer publishers and a receiver over a HashStore and real transports.

The publishers and the receiver are separate transport agents (``SimTransport`` moves bytes
through shared memory and a socket even within one process; ``NixlTransport`` through UCX), so
the data path is the real one; only the process boundary is missing. Tests and benchmarks use it
where spawning ranks would add nothing: warm-cycle accounting, atomic apply, the poller.
The receiver is one rank (target TP 1); multi-rank replicas live in :mod:`mx_sim.refit_sim`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mx_reference.refit.descriptors import SourceManifest
from mx_reference.refit.layouts import RefitModelConfig
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.publisher import PublisherConfig, RefitPublisher
from mx_reference.refit.receiver import CycleTiming, ReceiverConfig, RefitReceiver
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.replicas import ReplicaDirectory
from mx_reference.transport.base import Transport
from mx_sim.backends import CpuMockBackend
from mx_sim.models import TinyModelSpec
from mx_sim.refit_sim import MODEL_ID, rank_shards, version_model
from mx_sim.topology import RankInfo


@dataclass
class RigConfig:
    model_kind: str = "llama"
    model_spec: TinyModelSpec | None = None
    trainer_tp: int = 1
    trainer_ep: int = 1
    transport: str = "sim"
    timeout_s: float = 10.0


def make_transport(kind: str, name: str, faults=None) -> Transport:
    """A ``sim`` (optionally with a ``FaultPlan``) or ``nixl`` agent on CPU memory."""
    if kind == "nixl":
        from mx_reference.transport.nixl import NixlTransport

        return NixlTransport(name, CpuMockBackend())
    from mx_sim.transport import SimTransport

    return SimTransport(name, faults)


class RefitRig:
    """``publish(v)`` from every trainer rank, then ``receiver.refit(v)``."""

    def __init__(
        self,
        config: RigConfig | None = None,
        *,
        trainer_faults: dict[int, object] | None = None,
        post_load: Callable[[torch.nn.Module], None] | None = None,
    ):
        self.config = cfg = config or RigConfig()
        self.store = dist.HashStore()
        self.registry = VersionRegistry(self.store, timeout=cfg.timeout_s)
        self.backend = CpuMockBackend()
        faults = trainer_faults or {}
        self.publishers = []
        for ep in range(cfg.trainer_ep):
            for tp in range(cfg.trainer_tp):
                rank = ep * cfg.trainer_tp + tp
                transport = make_transport(cfg.transport, _name("trainer"), faults.get(rank))
                self.publishers.append(
                    RefitPublisher(
                        transport,
                        self.registry,
                        PublisherConfig(MODEL_ID),
                        backend=self.backend,
                        tp=(tp, cfg.trainer_tp),
                        ep=(ep, cfg.trainer_ep),
                    )
                )
        self.model = version_model(cfg.model_kind, cfg.model_spec, 0)
        self.model_config = RefitModelConfig.from_hf(self.model.config)
        self.receiver = self.new_receiver(self.model, post_load=post_load)

    def new_receiver(
        self,
        model: torch.nn.Module,
        *,
        prefer_replicas: bool = False,
        post_load: Callable[[torch.nn.Module], None] | None = None,
    ) -> RefitReceiver:
        return RefitReceiver(
            model,
            transport=make_transport(self.config.transport, _name("receiver")),
            registry=self.registry,
            config=ReceiverConfig(
                MODEL_ID, timeout_s=self.config.timeout_s, prefer_replicas=prefer_replicas
            ),
            target=TargetLayout(),
            model_config=self.model_config,
            backend=self.backend,
            directory=ReplicaDirectory(self.registry, MODEL_ID),
            post_load=post_load,
        )

    def version_state(self, version: int) -> dict[str, torch.Tensor]:
        return version_model(self.config.model_kind, self.config.model_spec, version).state_dict()

    def publish(self, version: int, keep: int = 2) -> list[SourceManifest]:
        """Every trainer rank publishes ``version``, after retiring all but ``keep - 1`` older."""
        for old in self.registry.discover(MODEL_ID)[keep - 1 :]:
            self.registry.retire(MODEL_ID, old)
            for pub in self.publishers:
                pub.retire(old)
        state = self.version_state(version)
        out = []
        for pub in self.publishers:
            info = RankInfo("trainer", 0, pub.tp[0], pub.tp[1], 0, 1, pub.ep[0], pub.ep[1])
            out.append(pub.publish(version, rank_shards(state, self.model_config, info)))
        return out

    def cycle(self, version: int) -> CycleTiming:
        self.publish(version)
        return self.receiver.refit(version)

    def close(self) -> None:
        self.receiver.close()
        self.receiver.transport.close()
        for pub in self.publishers:
            pub.close()
            pub.transport.close()


def _name(role: str) -> str:
    return f"{role}-{uuid.uuid4().hex[:8]}"
