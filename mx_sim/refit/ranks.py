"""The two rank bodies of every refit the simulator runs, and the one cycle check.

:class:`TrainerRank` publishes its Megatron shards of each version; :class:`ReceiverRank` takes
each version through a receiver and checks it against the trainer's weights. The same classes
run one per process (:mod:`~mx_sim.refit.multiprocess`, torchrun), as threads or side by side in
one process (:mod:`~mx_sim.refit.rig`, planning-only mode) and under the conformance checks,
where the receiver is the adapter's. Ground truth never comes from the receiver: it is
:class:`~mx_sim.fixtures.VersionWeights` (whose tensors all differ between versions) for the
HF-split trainer, or a Megatron-Core trainer's own logits
(:class:`~mx_sim.refit.megatron_trainer.MegatronLogits`).
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
from mx_reference.refit.wire import (
    Endpoint,
    ShardDescriptor,
    SourceManifest,
    encode_endpoint,
    make_manifest,
)
from mx_reference.transport.base import Transport
from mx_sim.cluster.topology import RankInfo
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import VersionWeights, fixed_prompt, rank_shards

MODEL_ID = "tiny"


class HfSplitShards:
    """The HF-split trainer: a rank's shards of version v are the reference
    ``megatron_shards_from_hf`` of the version's HF weights (for families or modes Megatron-Core
    does not run here, and for planning)."""

    def __init__(self, weights: VersionWeights, info: RankInfo):
        self.weights, self.info = weights, info

    def shards(self, version: int) -> list:
        """This rank's ``(descriptor, shard)`` pairs of ``version``."""
        i = self.info
        return rank_shards(
            self.weights.state(version),
            self.weights.model_config,
            tp=(i.tp_rank, i.tp_size),
            pp=(i.pp_rank, i.pp_size),
            ep=(i.ep_rank, i.ep_size),
        )


class TrainerRank:
    """One trainer rank: at each version it publishes the shards its ``source`` holds
    (:class:`HfSplitShards`, or a real Megatron-Core rank,
    :class:`~mx_sim.refit.megatron_trainer.MegatronTrainer`).

    Without a transport it is a planning-only rank: it publishes real manifests (descriptors at
    their arena offsets) and moves no byte.
    """

    def __init__(
        self,
        info: RankInfo,
        registry: VersionRegistry,
        transport: Transport | None,
        source: Any,
        *,
        model_id: str = MODEL_ID,
        sign_later: bool = False,
    ):
        assert info.role == "trainer", info
        self.info, self.registry, self.source, self.model_id = info, registry, source, model_id
        self.transport = transport
        self.publisher = (
            RefitPublisher(
                transport,
                registry,
                PublisherConfig(model_id, sign_later=sign_later),
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

    def publish(self, version: int, in_place: bool = False) -> SourceManifest:
        """Publish ``version`` of the source's shards: snapshot, or ``in_place`` where they
        lie (the source's shards are then views of one storage, :func:`packed_shards`)."""
        shards = self.source.shards(version)
        if self.publisher is not None:
            return self.publisher.publish(version, shards, in_place=in_place)
        descs = [d for d, _ in shards]
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


def packed_shards(
    shards: list[tuple[ShardDescriptor, torch.Tensor]],
) -> list[tuple[ShardDescriptor, torch.Tensor]]:
    """``shards`` copied into one flat buffer, as views of it (each at an aligned offset): what
    a trainer with a contiguous parameter buffer (Megatron's DDP) holds, published in place."""
    offsets, nbytes = arena_offsets([d for d, _ in shards])
    flat = torch.zeros(nbytes, dtype=torch.uint8)
    views = []
    for d, t in shards:
        at = offsets[d.name]
        views.append((d, flat[at : at + d.nbytes].view(t.dtype).view(t.shape)))
        views[-1][1].copy_(t)
    return views


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
    return copies(model_parameters(model))


def copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().clone() for n, t in tensors.items()}


def check_cycle(
    version: int,
    previous: Mapping[str, torch.Tensor],
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    want: Mapping[str, torch.Tensor] | None,
) -> list[str]:
    """For every tensor: before == A (``previous``), after == B (``want``), and A != B.
    Without ``want`` (the trainer's values are not known here, only its logits) B is what the
    cycle left, and must still differ from A. Returns the problems found, one line each."""
    want = after if want is None else want
    if set(after) != set(want):
        diff = sorted(set(after) ^ set(want))
        return [f"v{version}: parameter names differ from the trainer's: {diff}"]
    out = []
    for name, now in after.items():
        if torch.equal(previous[name], want[name]):
            out.append(f"v{version}: {name}: versions A and B are equal (vacuous check)")
        if not torch.equal(before[name], previous[name]):
            out.append(f"v{version}: {name}: value before the cycle is not the previous version")
        if not torch.equal(now, want[name]):
            err = (now.float() - want[name].float()).abs().max().item()
            out.append(
                f"v{version}: {name}: after refit differs from the trainer's version "
                f"(max abs diff {err:.3g})"
            )
    return out


def check_logits(
    version: int, model: torch.nn.Module, want: torch.Tensor, atol: float = 0.0
) -> tuple[float, list[str]]:
    """Logits on the fixed prompt equal ``want`` (the trainer's), within ``atol`` (0: bit for
    bit). Returns the largest absolute difference and the problems found."""
    prompt = fixed_prompt(model.config.vocab_size)
    device = next(model.parameters()).device
    with torch.no_grad():
        got = model(prompt.to(device)).logits.cpu()
    if got.shape != want.shape:
        shapes = f"{tuple(got.shape)} != the trainer's {tuple(want.shape)}"
        return float("inf"), [f"v{version}: logits shape {shapes}"]
    err = (got - want).abs().max().item()
    if (err <= atol) if atol else torch.equal(got, want):
        return err, []
    return err, [
        f"v{version}: logits differ from the trainer's (max abs {err:.3g}, allowed {atol:g})"
    ]


class ReceiverRank:
    """One inference rank: refits each version through ``receiver`` and checks it against
    ``oracle``: every tensor A -> B with A != B (B = ``oracle.params(v)`` where the oracle knows
    the values) and, when ``logits`` is set, the logits against ``oracle.logits(v)`` within
    ``oracle.atol`` (or ``logits_atol`` when larger: a TP forward sums in another order). The
    oracle is :class:`~mx_sim.fixtures.VersionWeights` (bit-exact) or a Megatron trainer's own
    logits (:class:`~mx_sim.refit.megatron_trainer.MegatronLogits`).

    A sharded engine passes ``local`` (its local tensors by name) and ``cut(full) -> local``,
    the suite's own slices of a version's full weights: then every local tensor is checked.
    Every tensor must also keep its storage address."""

    def __init__(
        self,
        receiver: Any,
        model: torch.nn.Module,
        oracle: Any,
        *,
        local: Mapping[str, torch.Tensor] | None = None,
        cut: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
        logits_atol: float = 0.0,
    ):
        self.receiver, self.model, self.oracle = receiver, model, oracle
        self.local = model_parameters(model) if local is None else local
        self.cut = cut or (lambda full: full)
        self.atol = max(oracle.atol, logits_atol)
        self.previous = copies(self.local)
        self.addresses = {n: t.data_ptr() for n, t in self.local.items()}
        self.logits_error = 0.0  # the largest logits difference seen

    def cycle(self, version: int, *, logits: bool = True) -> tuple[CycleTiming, list[str]]:
        """Refit ``version``; returns its timing and the problems the checks found."""
        before = copies(self.local)
        timing = self.receiver.refit(version)
        full = self.oracle.params(version)
        want = None if full is None else self.cut(full)
        problems = check_cycle(version, self.previous, before, copies(self.local), want)
        problems += [
            f"v{version}: {n}: storage moved (refit must copy in place)"
            for n, t in self.local.items()
            if t.data_ptr() != self.addresses[n]
        ]
        if logits:
            err, wrong = check_logits(version, self.model, self.oracle.logits(version), self.atol)
            self.logits_error = max(self.logits_error, err)
            problems += wrong
        self.previous = copies(self.local)
        return timing, problems
