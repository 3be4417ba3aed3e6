"""The two rank bodies of every refit the simulator runs, and the one cycle check.

:class:`TrainerRank` publishes its Megatron shards of each version; :class:`ReceiverRank` takes
each version through a receiver and checks it against the trainer's weights. The same classes
run one per process (:mod:`~mx_sim.refit.multiprocess`, torchrun), as threads or side by side in
one process (:mod:`~mx_sim.refit.rig`, planning-only mode) and under the conformance checks,
where the receiver is the adapter's. Ground truth never comes from the receiver: it is
:class:`~mx_sim.fixtures.VersionWeights`, whose tensors all differ between versions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import torch

from mx_reference.refit.apply import model_parameters
from mx_reference.refit.name_maps import RefitModelConfig
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.publisher import PublisherConfig, RefitPublisher, arena_offsets
from mx_reference.refit.receiver import CycleTiming, ReceiverConfig, RefitReceiver
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.wire import Endpoint, SourceManifest, encode_endpoint, make_manifest
from mx_reference.transport.base import Transport
from mx_sim.cluster.topology import RankInfo
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import VersionWeights, fixed_prompt, rank_shards

MODEL_ID = "tiny"


class TrainerRank:
    """One trainer rank: at each version it publishes its TP/PP/EP shards of the weights.

    Without a transport it is a planning-only rank: it publishes real manifests (descriptors at
    their arena offsets) and moves no byte.
    """

    def __init__(
        self,
        info: RankInfo,
        registry: VersionRegistry,
        transport: Transport | None,
        weights: VersionWeights,
        *,
        model_id: str = MODEL_ID,
    ):
        assert info.role == "trainer", info
        self.info, self.registry, self.weights, self.model_id = info, registry, weights, model_id
        self.transport = transport
        self.publisher = (
            RefitPublisher(
                transport,
                registry,
                PublisherConfig(model_id),
                backend=CpuMockBackend(),
                tp=self.tp,
                pp=(info.pp_rank, info.pp_size),
                ep=(info.ep_rank, info.ep_size),
            )
            if transport is not None
            else None
        )

    @property
    def tp(self) -> tuple[int, int]:
        return (self.info.tp_rank, self.info.tp_size)

    def shards(self, version: int) -> list:
        """This rank's ``(descriptor, shard)`` pairs of ``version``."""
        i = self.info
        return rank_shards(
            self.weights.state(version),
            self.weights.model_config,
            tp=self.tp,
            pp=(i.pp_rank, i.pp_size),
            ep=(i.ep_rank, i.ep_size),
        )

    def publish(self, version: int) -> SourceManifest:
        if self.publisher is not None:
            return self.publisher.publish(version, self.shards(version))
        descs = [d for d, _ in self.shards(version)]
        offsets, _ = arena_offsets(descs)
        i = self.info
        manifest = make_manifest(
            self.model_id,
            version,
            [msgspec.structs.replace(d, offset=offsets[d.name]) for d in descs],
            tp=self.tp,
            pp=(i.pp_rank, i.pp_size),
            ep=(i.ep_rank, i.ep_size),
            agent_metadata=encode_endpoint(
                Endpoint(transport_metadata=b"", base_addr=0, source_id=f"plan-{i.global_rank}")
            ),
        )
        self.registry.publish(manifest)
        return manifest

    def retire(self, version: int) -> None:
        """Free ``version``'s arena; rank 0 also retires it from the registry."""
        if self.info.global_rank == 0:
            self.registry.retire(self.model_id, version)
        if self.publisher is not None and version in self.publisher.live_versions():
            self.publisher.retire(version)

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        if self.transport is not None:
            self.transport.close()


def receiver_for(
    model: torch.nn.Module,
    *,
    registry: VersionRegistry,
    transport: Transport,
    target: TargetLayout,
    timeout_s: float,
    model_id: str = MODEL_ID,
    prefer_replicas: bool = False,
    make: Callable[..., Any] = RefitReceiver,
    **extra: Any,
) -> Any:
    """A receiver for ``model`` with the simulator's standard wiring; ``make`` is
    :class:`RefitReceiver` or an engine adapter's ``make_receiver`` (same keywords)."""
    return make(
        model,
        transport=transport,
        registry=registry,
        config=ReceiverConfig(model_id, timeout_s=timeout_s, prefer_replicas=prefer_replicas),
        target=target,
        model_config=RefitModelConfig.from_hf(model.config),
        **extra,
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's current value (CPU copies)."""
    return {n: p.detach().cpu().clone() for n, p in model_parameters(model).items()}


def check_cycle(
    version: int,
    previous: Mapping[str, torch.Tensor],
    before: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    want: Mapping[str, torch.Tensor],
) -> list[str]:
    """For every parameter: before == A (``previous``), after == B (``want``), and A != B.
    Returns the problems found, one line each."""
    after = model_parameters(model)
    if set(after) != set(want):
        return [
            f"v{version}: parameter names differ from the trainer's: {sorted(set(after) ^ set(want))}"
        ]
    out = []
    for name, now in after.items():
        if torch.equal(previous[name], want[name]):
            out.append(f"v{version}: {name}: versions A and B are equal (vacuous check)")
        if not torch.equal(before[name], previous[name]):
            out.append(f"v{version}: {name}: value before the cycle is not the previous version")
        now = now.detach().cpu()
        if not torch.equal(now, want[name]):
            err = (now.float() - want[name].float()).abs().max().item()
            out.append(
                f"v{version}: {name}: after refit differs from the trainer's version "
                f"(max abs diff {err:.3g})"
            )
    return out


def check_logits(version: int, model: torch.nn.Module, trainer: torch.nn.Module) -> list[str]:
    """Logits on the fixed prompt equal the trainer model's, bit for bit."""
    prompt = fixed_prompt(trainer.config.vocab_size)
    device = next(model.parameters()).device
    with torch.no_grad():
        got = model(prompt.to(device)).logits.cpu()
        want = trainer(prompt).logits
    if torch.equal(got, want):
        return []
    err = (got - want).abs().max().item()
    return [f"v{version}: logits differ from the trainer's (max abs {err:.3g})"]


class ReceiverRank:
    """One inference rank: refits each version through ``receiver`` and checks every tensor
    (A -> B, A != B) and, when ``logits`` is set, the logits against ``weights``."""

    def __init__(self, receiver: Any, model: torch.nn.Module, weights: VersionWeights):
        self.receiver, self.model, self.weights = receiver, model, weights
        self.previous = snapshot(model)

    def cycle(self, version: int, *, logits: bool = True) -> tuple[CycleTiming, list[str]]:
        """Refit ``version``; returns its timing and the problems the checks found."""
        before = snapshot(self.model)
        timing = self.receiver.refit(version)
        problems = check_cycle(
            version, self.previous, before, self.model, self.weights.params(version)
        )
        if logits:
            problems += check_logits(version, self.model, self.weights.model(version))
        self.previous = snapshot(self.model)
        return timing, problems
