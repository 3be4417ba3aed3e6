"""Replica fan-out: a receiver that applied version v serves v to other receivers.

A replica publishes its full (TP 1) Megatron-layout tensors under its own namespace in the
version registry, ``<model>.replica.<source id>``, with a source id unique to this incarnation:
a restarted replica gets a new id, so its manifests never shadow a dead one's (shared ids made
followers attach to dead agents in ModelExpress). :class:`ReplicaDirectory` lists the source sets
of a version: the trainers' and every replica's. Trainers come first unless a receiver asks to
prefer replicas (a fan-out tree). A replica's version is offered only while the trainers still
have it committed, so replicas retire with their version.
"""

from __future__ import annotations

import time
import uuid

import msgspec
import torch.distributed as dist

from mx_reference.backends import AcceleratorBackend
from mx_reference.refit.layouts import megatron_shards_from_hf
from mx_reference.refit.publisher import PublisherConfig, RefitPublisher
from mx_reference.refit.receiver import RefitReceiver
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.wire import SourceManifest
from mx_reference.transport.base import Transport

_POLL_S = 0.01


class ReplicaDirectory:
    """Source sets per version: trainers plus announced replicas (a ``SourceDirectory``)."""

    def __init__(self, registry: VersionRegistry, model_id: str):
        self.registry, self.model_id = registry, model_id
        self._ns = dist.PrefixStore(f"{registry.prefix}-replicas/{model_id}/", registry.store)

    def replica_model(self, source_id: str) -> str:
        return f"{self.model_id}.replica.{source_id}"

    def replica_ids(self) -> list[str]:
        if not self._ns.check(["ids"]):
            return []
        return msgspec.msgpack.decode(self._ns.get("ids"), type=list[str])

    def announce(self, source_id: str) -> None:
        self._update(lambda ids: sorted({*ids, source_id}))

    def withdraw(self, source_id: str) -> None:
        self._update(lambda ids: [i for i in ids if i != source_id])

    def sources(self, version: int, *, prefer_replicas: bool) -> list[list[SourceManifest]]:
        """Complete source sets holding ``version``; none once the trainers retired it."""
        if version not in self.registry.discover(self.model_id, version):
            return []
        trainers = self.registry.manifests(self.model_id, version)
        replicas = [
            self.registry.manifests(self.replica_model(i), version)
            for i in self.replica_ids()
            if version in self.registry.discover(self.replica_model(i), version)
        ]
        return [*replicas, trainers] if prefer_replicas else [trainers, *replicas]

    def _update(self, change) -> None:
        deadline = time.monotonic() + self.registry.timeout
        while True:
            cur = self._ns.get("ids") if self._ns.check(["ids"]) else b""
            old = msgspec.msgpack.decode(cur, type=list[str]) if cur else []
            new = msgspec.msgpack.encode(change(old))
            if self._ns.compare_set("ids", cur, new) == new:  # type: ignore[arg-type]
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"replica list update did not settle in {self.registry.timeout}s"
                )
            time.sleep(_POLL_S)


class ReplicaSource:
    """Republishes a receiver's applied version as a replica source (one rank per replica)."""

    def __init__(
        self,
        receiver: RefitReceiver,
        directory: ReplicaDirectory,
        transport: Transport,
        *,
        backend: AcceleratorBackend | None = None,
    ):
        self.receiver, self.directory = receiver, directory
        self.source_id = f"replica-{uuid.uuid4().hex[:12]}"
        self.publisher = RefitPublisher(
            transport,
            directory.registry,
            PublisherConfig(directory.replica_model(self.source_id), source_kind="replica"),
            backend=backend,
            source_id=self.source_id,
        )

    def republish(self) -> SourceManifest:
        """Serve the receiver's applied version; retire the one served before."""
        rx = self.receiver
        hf = dict(rx.model.named_parameters(remove_duplicate=False))
        shards = megatron_shards_from_hf(
            hf, rx.model_config, tp_size=1, tp_rank=0, expert_layout=rx.config.expert_layout
        )
        previous = self.publisher.live_versions()
        manifest = self.publisher.publish(rx.applied_version, [(d, t.detach()) for d, t in shards])
        self.directory.announce(self.source_id)
        for v in previous:
            self.directory.registry.retire(self.publisher.config.model_id, v)
            self.publisher.retire(v)
        return manifest

    def close(self) -> None:
        """Withdraw from the directory and release the arenas."""
        self.directory.withdraw(self.source_id)
        for v in self.publisher.live_versions():
            self.directory.registry.retire(self.publisher.config.model_id, v)
        self.publisher.close()
