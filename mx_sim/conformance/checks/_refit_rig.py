"""What the refit checks share: trainer ranks that publish weight versions, receivers the adapter
builds, and the comparisons against the trainer's model.

Everything runs in this process: the version registry is a ``HashStore``, every trainer rank and
every receiver is its own ``SimTransport`` agent (real bytes through shared memory and a socket,
so a ``FaultPlan`` can fail a read), and the ranks of a multi-rank receiver replica are threads
over one gloo group. Ground truth never comes from the adapter: the trainer's model at version
``v`` is :func:`mx_sim.refit_sim.version_model` (no tensor equal across versions), sharded by
the reference ``megatron_shards_from_hf``.
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mx_reference.refit.apply import model_parameters
from mx_reference.refit.layouts import RefitModelConfig
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.publisher import PublisherConfig, RefitPublisher
from mx_reference.refit.receiver import ReceiverConfig
from mx_reference.refit.registry import VersionRegistry
from mx_sim.backends import CpuMockBackend
from mx_sim.models import TinyModelSpec, fixed_prompt
from mx_sim.ranks import gloo_group
from mx_sim.refit_sim import rank_shards, version_model
from mx_sim.topology import RankInfo
from mx_sim.transport import FaultPlan, SimTransport

MODEL_ID = "conformance"
TIMEOUT_S = 5.0  # every wait: registry, transfer, gloo collective
T = TypeVar("T")


@functools.lru_cache(maxsize=16)
def trainer_model(kind: str, spec: TinyModelSpec, version: int) -> torch.nn.Module:
    """The trainer's model at ``version`` (cached across checks, which only read it)."""
    return version_model(kind, spec, version)


def trainer_params(kind: str, spec: TinyModelSpec, version: int) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model_parameters(trainer_model(kind, spec, version)).items()}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's current value (CPU copies)."""
    return {n: p.detach().cpu().clone() for n, p in model_parameters(model).items()}


def build(adapter: Any, kind: str, spec: TinyModelSpec) -> torch.nn.Module:
    """The adapter's model of ``kind``, from weights no trainer version has (seed 1000)."""
    return adapter.build_model(kind, seed=1000, **asdict(spec))


class Trainers:
    """Trainer ranks (TP x PP x EP) of one tiny model, each publishing over its own agent.

    ``faults`` maps a trainer's rank index to the ``FaultPlan`` its agent applies to the reads
    it serves (one read per receiver rank per cycle).
    """

    def __init__(
        self,
        kind: str,
        spec: TinyModelSpec,
        *,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        faults: Mapping[int, FaultPlan] | None = None,
    ):
        self.kind, self.spec = kind, spec
        self.registry = VersionRegistry(dist.HashStore(), timeout=TIMEOUT_S)
        self.model_config = RefitModelConfig.from_hf(trainer_model(kind, spec, 1).config)
        self._agents: list[SimTransport] = []
        self._receivers: list[Any] = []
        self.ranks = [
            RankInfo("trainer", i, t, tp, p, pp, e, ep)
            for i, (e, p, t) in enumerate(itertools.product(range(ep), range(pp), range(tp)))
        ]
        faults = faults or {}
        self.publishers = [
            RefitPublisher(
                self._agent("trainer", faults.get(info.global_rank)),
                self.registry,
                PublisherConfig(MODEL_ID),
                backend=CpuMockBackend(),
                tp=(info.tp_rank, tp),
                pp=(info.pp_rank, pp),
                ep=(info.ep_rank, ep),
            )
            for info in self.ranks
        ]

    def _agent(self, role: str, faults: FaultPlan | None = None) -> SimTransport:
        agent = SimTransport(f"conf-{role}-{uuid.uuid4().hex[:8]}", faults)
        self._agents.append(agent)
        return agent

    def publish(self, version: int) -> int:
        """Every rank publishes ``version`` (older versions but the previous one retired);
        returns the bytes published."""
        for old in self.registry.discover(MODEL_ID)[1:]:
            self.registry.retire(MODEL_ID, old)
            for pub in self.publishers:
                pub.retire(old)
        state = trainer_model(self.kind, self.spec, version).state_dict()
        published = 0
        for pub, info in zip(self.publishers, self.ranks, strict=True):
            manifest = pub.publish(version, rank_shards(state, self.model_config, info))
            published += sum(d.nbytes for d in manifest.tensors)
        return published

    def receiver(
        self,
        adapter: Any,
        model: torch.nn.Module,
        target: TargetLayout | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> Any:
        """The adapter's receiver for ``model`` at ``target``, on a fresh agent."""
        receiver = adapter.make_receiver(
            model,
            transport=self._agent("receiver"),
            registry=self.registry,
            config=ReceiverConfig(MODEL_ID, timeout_s=TIMEOUT_S),
            target=target or TargetLayout(),
            model_config=RefitModelConfig.from_hf(model.config),
            group=group,
        )
        self._receivers.append(receiver)
        return receiver

    def close(self) -> None:
        for receiver in self._receivers:
            receiver.close()
        for pub in self.publishers:
            pub.close()
        for agent in self._agents:
            agent.close()

    def __enter__(self) -> Trainers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Replica:
    """``size`` ranks of one inference replica as threads, each holding one gloo group member;
    :meth:`map` runs a function on every rank at once (collectives need all of them)."""

    def __init__(self, size: int):
        self.size = size
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="conf-replica")
        store = dist.HashStore()
        name = f"replica-{uuid.uuid4().hex[:8]}"
        self.groups = self.map(lambda r: gloo_group(store, name, list(range(size)), r, TIMEOUT_S))

    def map(self, fn: Callable[[int], T]) -> list[T]:
        """``fn(rank)`` on every rank concurrently; the first rank's exception is raised."""
        futures = [self._pool.submit(fn, r) for r in range(self.size)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_cycle(
    version: int,
    previous: Mapping[str, torch.Tensor],
    before: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    want: Mapping[str, torch.Tensor],
    who: str = "",
) -> None:
    """For every parameter: before == A (``previous``), after == B (``want``), and A != B."""
    after = model_parameters(model)
    if set(after) != set(want):
        diff = sorted(set(after) ^ set(want))
        raise AssertionError(f"{who}v{version}: parameter names differ from the trainer's: {diff}")
    for name, now in after.items():
        assert not torch.equal(previous[name], want[name]), f"{name}: A == B (vacuous)"
        if not torch.equal(before[name], previous[name]):
            raise AssertionError(f"{who}v{version}: {name}: changed between cycles")
        if not torch.equal(now.detach().cpu(), want[name]):
            err = (now.detach().cpu().float() - want[name].float()).abs().max().item()
            raise AssertionError(
                f"{who}v{version}: {name}: after refit differs from the trainer's version "
                f"(max abs diff {err:.3g})"
            )


def check_logits(version: int, model: torch.nn.Module, kind: str, spec: TinyModelSpec) -> None:
    """Logits on the fixed prompt equal the trainer model's at ``version``, bit for bit."""
    trainer = trainer_model(kind, spec, version)
    prompt = fixed_prompt(trainer.config.vocab_size)
    device = next(model.parameters()).device
    with torch.no_grad():
        got = model(prompt.to(device)).logits.cpu()
        want = trainer(prompt).logits
    if not torch.equal(got, want):
        err = (got - want).abs().max().item()
        raise AssertionError(f"v{version}: logits differ from the trainer's (max abs {err:.3g})")
