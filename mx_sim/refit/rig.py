"""The in-process refit rig: every trainer rank of a topology, and receivers, in one process.

Trainer ranks (:class:`~mx_sim.refit.ranks.TrainerRank`, numbered in Megatron's order by
:class:`~mx_sim.cluster.topology.TopologySpec`) publish over a ``HashStore`` registry, each on
its own transport agent; receivers are built on agents of their own, so the data path is the
real one (``SimTransport`` moves bytes through shared memory and a socket even within one
process; ``NixlTransport`` through UCX) and only the process boundary is missing. A multi-rank
receiver replica runs its ranks as threads over one gloo group (:class:`Replica`).

Tests, benchmarks and the conformance checks use it where spawning processes would add nothing:
warm-cycle accounting, atomic apply, the poller, an adapter's receiver.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mx_reference.refit.layouts import RefitModelConfig
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.receiver import CycleTiming, RefitReceiver
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.replicas import ReplicaDirectory
from mx_reference.refit.wire import SourceManifest
from mx_reference.transport.base import Transport
from mx_sim.cluster.launch import StoreAddress, gloo_group, host_store, launch
from mx_sim.cluster.topology import TopologySpec
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import TinyModelSpec, VersionWeights, version_model
from mx_sim.refit.faults import Fault
from mx_sim.refit.hf_tp_engine import init_replica_group
from mx_sim.refit.ranks import MODEL_ID, HfSplitShards, TrainerRank, receiver_for
from mx_sim.sim_transport import make_transport

T = TypeVar("T")


@dataclass
class RigConfig:
    model_kind: str = "llama"
    model_spec: TinyModelSpec | None = None
    trainer_tp: int = 1
    trainer_pp: int = 1
    trainer_ep: int = 1
    transport: str = "sim"
    timeout_s: float = 10.0
    fault: Fault | None = None  # a trainer-side transport fault (its FaultKind has a plan)
    tcp_store: bool = False  # host the registry on a loopback TCPStore: ranks in other
    # processes reach it at ``rig.address``
    sign_later: bool = False  # publishers hash after publishing (PublisherConfig.sign_later)


class RefitRig:
    """``publish(v)`` from every trainer rank; receivers from :meth:`new_receiver`.

    :attr:`model` and :attr:`receiver` are a default one-rank receiver at TP 1, made on first
    use (with ``post_load``); :meth:`cycle` publishes a version and refits it.
    """

    def __init__(
        self,
        config: RigConfig | None = None,
        *,
        post_load: Callable[[torch.nn.Module], None] | None = None,
    ):
        self.config = cfg = config or RigConfig()
        self.weights = VersionWeights(cfg.model_kind, cfg.model_spec or TinyModelSpec())
        self.spec = TopologySpec(
            trainer_tp=cfg.trainer_tp, trainer_pp=cfg.trainer_pp, trainer_ep=cfg.trainer_ep
        )
        self.address: StoreAddress | None = None
        self.store: dist.Store = dist.HashStore()
        if cfg.tcp_store:
            self._master, self.address = host_store(_name("rig"), cfg.timeout_s)
            self.store = dist.PrefixStore(self.address.prefix, self._master)
        self.registry = VersionRegistry(self.store, timeout=cfg.timeout_s)
        self.backend = CpuMockBackend()
        self._post_load = post_load
        self._agents: list[Transport] = []
        self._receivers: list[Any] = []
        self.trainers = self._start_trainers()

    def _start_trainers(self) -> list[TrainerRank]:
        trainers = []
        fault = self.config.fault
        for rank in range(self.spec.num_trainers):
            plan = fault.transport_plan(rank) if fault is not None else None
            agent = make_transport(self.config.transport, _name("trainer"), faults=plan)
            info = self.spec.rank_info(rank)
            source = HfSplitShards(self.weights, info)
            trainers.append(
                TrainerRank(info, self.registry, agent, source, sign_later=self.config.sign_later)
            )
        return trainers

    def restart_trainers(self, trainer_tp: int, trainer_pp: int = 1, trainer_ep: int = 1) -> None:
        """The trainer job restarts at another layout (a resharded checkpoint): its ranks retire
        every version and go; new ranks publish on the same registry from the next version."""
        for version in self.registry.discover(MODEL_ID):
            for trainer in self.trainers:
                trainer.retire(version)
        for trainer in self.trainers:
            trainer.close()
        self.config = dataclasses.replace(
            self.config, trainer_tp=trainer_tp, trainer_pp=trainer_pp, trainer_ep=trainer_ep
        )
        self.spec = TopologySpec(
            trainer_tp=trainer_tp, trainer_pp=trainer_pp, trainer_ep=trainer_ep
        )
        self.trainers = self._start_trainers()

    @property
    def publishers(self) -> list:
        return [t.publisher for t in self.trainers]

    @property
    def model_config(self) -> RefitModelConfig:
        return self.weights.model_config

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        """The default receiver's model, starting at version 0 (weights no trainer publishes)."""
        return version_model(self.config.model_kind, self.weights.spec, 0)

    @functools.cached_property
    def receiver(self) -> RefitReceiver:
        return self.new_receiver(self.model, post_load=self._post_load)

    def version_state(self, version: int) -> dict[str, torch.Tensor]:
        return self.weights.state(version)

    def new_receiver(
        self,
        model: torch.nn.Module,
        *,
        target: TargetLayout | None = None,
        group: dist.ProcessGroup | None = None,
        make: Callable[..., Any] | None = None,
        prefer_replicas: bool = False,
        **extra: Any,
    ) -> Any:
        """A receiver for ``model`` on a fresh agent, closed with the rig. ``make`` is an
        adapter's ``make_receiver``; by default a :class:`RefitReceiver` on the CPU mock with
        the replica directory."""
        if make is None:
            make = RefitReceiver
            extra.setdefault("backend", self.backend)
            extra.setdefault("directory", ReplicaDirectory(self.registry, MODEL_ID))
        agent = make_transport(self.config.transport, _name("receiver"), serves=False)
        self._agents.append(agent)
        receiver = receiver_for(
            model,
            registry=self.registry,
            transport=agent,
            target=target or TargetLayout(),
            timeout_s=self.config.timeout_s,
            prefer_replicas=prefer_replicas,
            make=make,
            group=group,
            **extra,
        )
        self._receivers.append(receiver)
        return receiver

    def publish(self, version: int, keep: int = 2) -> list[SourceManifest]:
        """Every trainer rank publishes ``version``, after retiring all but ``keep - 1`` older."""
        for old in self.registry.discover(MODEL_ID)[keep - 1 :]:
            for trainer in self.trainers:
                trainer.retire(old)
        return [t.publish(version) for t in self.trainers]

    def published_bytes(self, version: int) -> int:
        return sum(d.nbytes for m in self.registry.manifests(MODEL_ID, version) for d in m.tensors)

    def cycle(self, version: int) -> CycleTiming:
        """Publish ``version`` and refit the default receiver."""
        self.publish(version)
        return self.receiver.refit(version)

    def close(self) -> None:
        for receiver in self._receivers:
            receiver.close()
        for agent in self._agents:
            agent.close()
        for trainer in self.trainers:
            trainer.close()

    def __enter__(self) -> RefitRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Replica:
    """``size`` ranks of one inference replica as threads, each holding one gloo group member;
    :meth:`map` runs a function on every rank at once (collectives need all of them)."""

    def __init__(self, size: int, timeout_s: float = 5.0):
        self.size = size
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="replica")
        store = dist.HashStore()
        name = f"replica-{uuid.uuid4().hex[:8]}"
        members = list(range(size))
        self.groups = self.map(lambda r: gloo_group(store, name, members, r, timeout_s))

    def map(self, fn: Callable[[int], T]) -> list[T]:
        """``fn(rank)`` on every rank concurrently. Once every rank is done, the exception of
        the rank that failed first is raised: the others' are usually its consequence (a
        collective or a version waiting for it)."""
        futures = [self._pool.submit(fn, r) for r in range(self.size)]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        first = next((f for f in done if f.exception() is not None), None)
        wait(futures)
        if first is not None:
            first.result()  # raises its exception
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replica_ranks(
    rig: RefitRig,
    size: int,
    fn: Callable[..., T],
    args: tuple = (),
    *,
    processes: bool = False,
    deadline_s: float = 120.0,
) -> list[T]:
    """``fn(rank, group, registry, *args)`` on every rank of a ``size``-rank replica refitting
    from ``rig``; returns the ranks' results.

    By default the ranks are threads of this process (:class:`Replica`; ``group`` is ``None``
    for one rank). With ``processes`` each rank is a process of its own whose default gloo
    group is the replica (transformers' TP builds its device mesh over the world): the rig
    must have been made with ``tcp_store``, ``fn`` and ``args`` must pickle, and a rank's
    failure is raised here as ``AssertionError`` with its message.
    """
    if not processes:
        with Replica(size, rig.config.timeout_s) as replica:
            groups = replica.groups if size > 1 else [None]
            return replica.map(lambda r: fn(r, groups[r], rig.registry, *args))
    if rig.address is None:
        raise ValueError("replica ranks as processes need a rig made with tcp_store=True")
    outcomes = launch(_replica_process, size, (fn, size, rig.address, args), timeout_s=deadline_s)
    for o in outcomes:
        if o.status != "ok":
            first = (o.error or f"exit code {o.exitcode}").splitlines()[0]
            raise AssertionError(f"replica rank {o.rank}/{size} {o.status}: {first}")
    return [o.value for o in outcomes]


def _replica_process(
    rank: int, fn: Callable[..., T], size: int, address: StoreAddress, args: tuple
) -> T:
    store = address.connect()
    group = init_replica_group(store, 0, rank, size, address.timeout_s)
    return fn(rank, group, VersionRegistry(store, timeout=address.timeout_s), *args)


def _name(role: str) -> str:
    return f"{role}-{uuid.uuid4().hex[:8]}"
