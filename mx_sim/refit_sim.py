"""The multi-process refit simulator: trainer ranks publish, receiver replicas refit real HF models.

Each rank is a real process (:mod:`mx_sim.ranks`) with gloo groups (trainer TP and PP, one per
receiver replica) and a TCPStore holding the version registry. Trainers shard the version's HF
weights into Megatron layout (``megatron_shards_from_hf``) and publish them; receivers start from
other weights, refit each version through the reference receiver, and check it: every tensor
went from the previous version A to this version B (A != B), and logits on a fixed prompt equal
the trainer model's bit for bit.

Programmatic entry: :func:`run_topology`. The same rank code runs under ``torchrun``::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr 127.0.0.1 \\
        --master-port 29500 -m mx_sim.refit_sim --model llama --trainer-tp 2 --inference-tp 2 \\
        --out /tmp/refit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from mx_reference.refit.apply import model_digest
from mx_reference.refit.gather import vote
from mx_reference.refit.layouts import RefitModelConfig, megatron_shards_from_hf
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.publisher import PublisherConfig, RefitPublisher
from mx_reference.refit.receiver import ReceiverConfig, RefitError, RefitReceiver
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.replicas import ReplicaDirectory, ReplicaSource
from mx_sim.backends import CpuMockBackend
from mx_sim.models import TinyModelSpec, build_tiny_model, fixed_prompt
from mx_sim.ranks import RankOutcome, gloo_group, host_store, launch, store_from_env
from mx_sim.topology import RankInfo, TopologySpec

MODEL_ID = "tiny"
FAULTS = (
    "publisher_killed",
    "receiver_killed",
    "slow_rank",
    "corrupt_shard",
    "stale_version",
    "store_gone",
)
STORE_GONE_KEY = "fault/store_gone"


@dataclass(frozen=True)
class FaultSpec:
    """One scripted fault: ``kind`` strikes in cycle ``cycle`` (1-based) on global ``rank``."""

    kind: str
    cycle: int = 2
    rank: int = 0
    delay_s: float = 4.0  # slow_rank: how late the rank publishes

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"FaultSpec.kind {self.kind!r} not in {', '.join(FAULTS)}")
        if self.cycle < 1:
            raise ValueError(f"FaultSpec.cycle must be >= 1, got {self.cycle}")


@dataclass(frozen=True)
class RunConfig:
    """Everything every rank needs (pickled to each process)."""

    spec: TopologySpec
    model_kind: str = "llama"
    model_spec: TinyModelSpec = TinyModelSpec()
    cycles: int = 3
    transport: str = "sim"
    fault: FaultSpec | None = None
    timeout_s: float = 20.0
    fanout: bool = False  # replica 0 republishes; the other replicas pull from it


@dataclass
class RefitRunResult:
    """One topology run: per-rank outcomes and per-cycle timing records."""

    label: str
    model_kind: str
    transport: str
    passed: bool
    seconds: float
    bytes_moved: int
    ranks: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def receiver_cycles(self) -> list[list[dict[str, Any]]]:
        """Timing records per receiver rank, cycle by cycle."""
        return [r["cycles"] for r in self.ranks if r.get("role") == "receiver"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- weights and layout helpers ------------------------------------------------------------


def version_model(kind: str, spec: TinyModelSpec | None, version: int) -> torch.nn.Module:
    """The trainer's model at ``version``: a fresh seed, shifted so that no tensor (layer norms
    included) equals its value at any other version."""
    model = build_tiny_model(kind, spec, seed=version)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(version / 128)
    return model


def pp_stage(name: str, num_layers: int, pp_size: int) -> int:
    """The pipeline stage holding Megatron tensor ``name`` (even layer split)."""
    layer = re.match(r"decoder\.layers\.(\d+)\.", name)
    if layer:
        return int(layer.group(1)) * pp_size // num_layers
    return 0 if name.startswith("embedding.") else pp_size - 1


def rank_shards(state: dict, mcfg: RefitModelConfig, info: RankInfo) -> list:
    """What trainer rank ``info`` publishes: its TP/EP shards of its PP stage's tensors."""
    shards = megatron_shards_from_hf(
        state,
        mcfg,
        tp_size=info.tp_size,
        tp_rank=info.tp_rank,
        ep_size=info.ep_size,
        ep_rank=info.ep_rank,
    )
    return [
        (d, t) for d, t in shards if pp_stage(d.name, mcfg.num_layers, info.pp_size) == info.pp_rank
    ]


def _transport(cfg: RunConfig, name: str, info: RankInfo):
    if cfg.transport == "nixl":
        from mx_reference.transport.nixl import NixlTransport

        return NixlTransport(name, CpuMockBackend())
    from mx_sim.transport import FaultPlan, SimTransport

    fault, plan = cfg.fault, FaultPlan()
    if fault is not None and fault.rank == info.global_rank and info.role == "trainer":
        served = fault.cycle - 1  # each receiver rank reads a trainer once per cycle
        if fault.kind == "publisher_killed":
            plan = FaultPlan(die_on=served, die_after_bytes=64)
        elif fault.kind == "corrupt_shard":
            plan = FaultPlan(corrupt_on=served, corrupt_bytes=1)
    return SimTransport(name, plan)


def _strikes(cfg: RunConfig, kind: str, info: RankInfo, cycle: int) -> bool:
    f = cfg.fault
    return f is not None and f.kind == kind and f.cycle == cycle and f.rank == info.global_rank


def _wait_store_gone(store: dist.Store, timeout_s: float) -> None:
    """Block until the parent has shut the store down (its next call raises)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        store.check([STORE_GONE_KEY])  # raises DistNetworkError once the server is gone
        time.sleep(0.01)


def _wait_count(store: dist.Store, key: str, want: int, abort: str, timeout_s: float) -> None:
    """Wait for counter ``key`` to reach ``want``; fail early when ``abort`` appears."""
    deadline = time.monotonic() + timeout_s
    while int(store.add(key, 0)) < want:
        if store.check([abort]):
            raise RefitError(f"receivers aborted: {store.get(abort).decode()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: {store.add(key, 0)}/{want} receivers within {timeout_s}s")
        time.sleep(0.01)


# ---- rank bodies ---------------------------------------------------------------------------


def _trainer(cfg: RunConfig, info: RankInfo, store: dist.Store, groups: dict) -> dict[str, Any]:
    spec, mcfg = cfg.spec, None
    registry = VersionRegistry(store, timeout=cfg.timeout_s)
    transport = _transport(cfg, f"trainer{info.global_rank}-{uuid.uuid4().hex[:6]}", info)
    publisher = RefitPublisher(
        transport,
        registry,
        PublisherConfig(MODEL_ID),
        backend=CpuMockBackend(),
        tp=(info.tp_rank, info.tp_size),
        pp=(info.pp_rank, info.pp_size),
        ep=(info.ep_rank, info.ep_size),
    )
    try:
        for cycle in range(1, cfg.cycles + 1):
            abort = f"abort/v{cycle}"
            if _strikes(cfg, "store_gone", info, cycle):
                store.set(STORE_GONE_KEY, b"1")
                _wait_store_gone(store, cfg.timeout_s)
            if _strikes(cfg, "slow_rank", info, cycle):
                time.sleep(cfg.fault.delay_s)  # type: ignore[union-attr]
            stale = cfg.fault is not None and cfg.fault.kind == "stale_version"
            if not (stale and cycle == cfg.fault.cycle):  # type: ignore[union-attr]
                model = version_model(cfg.model_kind, cfg.model_spec, cycle)
                mcfg = mcfg or RefitModelConfig.from_hf(model.config)
                publisher.publish(cycle, rank_shards(model.state_dict(), mcfg, info))
            # the whole TP group learns whether every member published
            if not vote(True, groups.get("tp")):
                raise RefitError(f"v{cycle}: a trainer TP peer failed to publish")
            _wait_count(store, f"done/v{cycle}", spec.num_receivers, abort, cfg.timeout_s)
            if (cycle - 1) in publisher.live_versions():
                if info.global_rank == 0:
                    registry.retire(MODEL_ID, cycle - 1)
                publisher.retire(cycle - 1)
        return {"cycles": [], "published": publisher.stats.versions_published}
    finally:
        publisher.close()
        transport.close()


def _receiver(cfg: RunConfig, info: RankInfo, store: dist.Store, groups: dict) -> dict[str, Any]:
    registry = VersionRegistry(store, timeout=cfg.timeout_s)
    model = version_model(cfg.model_kind, cfg.model_spec, 0)
    mcfg = RefitModelConfig.from_hf(model.config)
    transport = _transport(cfg, f"receiver{info.global_rank}-{uuid.uuid4().hex[:6]}", info)
    directory = ReplicaDirectory(registry, MODEL_ID)
    root = cfg.fanout and info.replica == 0
    receiver = RefitReceiver(
        model,
        transport=transport,
        registry=registry,
        config=ReceiverConfig(
            MODEL_ID, timeout_s=cfg.timeout_s, prefer_replicas=cfg.fanout and not root
        ),
        target=TargetLayout(tp_size=info.tp_size, tp_rank=info.tp_rank),
        model_config=mcfg,
        backend=CpuMockBackend(),
        group=groups.get("replica"),
        directory=directory,
        owns=lambda name: pp_stage(name, mcfg.num_layers, info.pp_size) == info.pp_rank,
    )
    serves = root and info.tp_rank == 0 and info.pp_rank == 0
    source = (
        ReplicaSource(receiver, directory, transport, backend=CpuMockBackend()) if serves else None
    )
    prompt = fixed_prompt(model.config.vocab_size)
    cycles, failures = [], []
    expected = dict(version_model(cfg.model_kind, cfg.model_spec, 0).named_parameters())
    try:
        for cycle in range(1, cfg.cycles + 1):
            if _strikes(cfg, "receiver_killed", info, cycle):
                os._exit(17)
            if cfg.fanout and not root:
                store.wait([f"replica_ready/v{cycle}"])
            before = {n: p.detach().clone() for n, p in receiver.params.items()}
            digest = model_digest(model)
            try:
                timing = receiver.refit(cycle)
            except (RefitError, TimeoutError, RuntimeError) as exc:
                unchanged = model_digest(model) == digest
                _try_abort(store, cycle, f"rank {info.global_rank}: {exc}")
                return {
                    "cycles": cycles,
                    "error": f"{type(exc).__name__}: {exc}",
                    "digest_unchanged": unchanged,
                    "failed_cycle": cycle,
                }
            oracle = version_model(cfg.model_kind, cfg.model_spec, cycle)
            failures += _check_cycle(cycle, expected, before, receiver.params, oracle)
            if not torch.equal(model(prompt).logits, oracle(prompt).logits):
                failures.append(f"v{cycle}: logits differ from the trainer model")
            expected = dict(oracle.named_parameters())
            cycles.append(timing.to_json())
            if source is not None:
                source.republish()
                store.set(f"replica_ready/v{cycle}", b"1")
            store.add(f"done/v{cycle}", 1)
        if source is not None:  # followers may still be reading the last version served
            last = f"done/v{cfg.cycles}"
            _wait_count(store, last, cfg.spec.num_receivers, f"abort/v{cfg.cycles}", cfg.timeout_s)
        return {"cycles": cycles, "failures": failures}
    finally:
        if source is not None:
            source.close()
        receiver.close()
        transport.close()


def _check_cycle(cycle, previous, before, after, oracle) -> list[str]:
    """before == A (previous version), after == B (this version), A != B, for every tensor."""
    out = []
    want = dict(oracle.named_parameters())
    for name, now in after.items():
        if not torch.equal(before[name], previous[name]):
            out.append(f"v{cycle}: {name}: value before the cycle is not the previous version")
        if not torch.equal(now, want[name]):
            out.append(f"v{cycle}: {name}: value after the cycle is not the trainer's")
        if torch.equal(previous[name], want[name]):
            out.append(f"v{cycle}: {name}: versions A and B are equal (vacuous check)")
    return out


def _try_abort(store: dist.Store, cycle: int, reason: str) -> None:
    try:
        store.set(f"abort/v{cycle}", reason.encode())
    except RuntimeError:  # the store itself may be the fault
        pass


def rank_main(rank: int, cfg: RunConfig, addr: Any) -> dict[str, Any]:
    """One rank of a run; ``addr.connect()`` gives the run's store."""
    store = addr.connect()
    info = cfg.spec.rank_info(rank)
    result: dict[str, Any] = {"rank": rank, "role": info.role, "tp_rank": info.tp_rank}
    try:
        groups = {
            kind: gloo_group(store, _group_name(cfg.spec, members), members, rank, cfg.timeout_s)
            for kind, members in cfg.spec.groups_of(rank).items()
            if len(members) > 1
        }
        body = _trainer if info.role == "trainer" else _receiver
        result.update(body(cfg, info, store, groups))
    except Exception as exc:  # a clear error per rank, reported, never a hang
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def _group_name(spec: TopologySpec, members: list[int]) -> str:
    return next(name for name, m in spec.groups().items() if m == members)


# ---- the parent ----------------------------------------------------------------------------


def run_topology(
    spec: TopologySpec,
    model_kind: str = "llama",
    cycles: int = 3,
    transport: str = "sim",
    faults: FaultSpec | None = None,
    out_dir: Path | None = None,
    *,
    model_spec: TinyModelSpec | None = None,
    fanout: bool = False,
    timeout_s: float = 20.0,
    deadline_s: float = 120.0,
) -> RefitRunResult:
    """Run ``spec`` for ``cycles`` refit cycles in real processes; never hangs past
    ``deadline_s``. With ``faults``, ``passed`` means the fault was contained: every rank ended
    with a clear error (or was the one killed) and no receiver's model changed in that cycle."""
    if transport not in ("sim", "nixl"):
        raise ValueError(f"transport {transport!r} not in ('sim', 'nixl')")
    cfg = RunConfig(
        spec,
        model_kind,
        model_spec or TinyModelSpec(),
        cycles,
        transport,
        faults,
        timeout_s,
        fanout,
    )
    master, addr = host_store(f"run-{uuid.uuid4().hex[:8]}", timeout_s)
    holder: dict[str, Any] = {"store": dist.PrefixStore(addr.prefix, master)}
    del master  # ``holder`` keeps the only reference: dropping it shuts the server down

    def on_poll() -> None:
        if holder["store"] is not None and faults is not None and faults.kind == "store_gone":
            if holder["store"].check([STORE_GONE_KEY]):
                holder["store"] = None

    start = time.perf_counter()
    outcomes = launch(
        rank_main, spec.world_size, (cfg, addr), timeout_s=deadline_s, on_poll=on_poll
    )
    holder["store"] = None
    result = _summarize(cfg, outcomes, time.perf_counter() - start)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = f"refit-{spec.label().replace('>', '')}-{model_kind}.json"
        (out_dir / name).write_text(json.dumps(result.to_json(), indent=2, default=str))
    return result


def _summarize(cfg: RunConfig, outcomes: list[RankOutcome], seconds: float) -> RefitRunResult:
    ranks, errors = [], []
    for o in outcomes:
        role = cfg.spec.rank_info(o.rank).role
        value = dict(o.value) if o.status == "ok" else {"rank": o.rank, "role": role}
        value.update(status=o.status, seconds=o.seconds)
        if o.status != "ok":
            value["error"] = o.error or f"exit code {o.exitcode}"
        ranks.append(value)
        for msg in value.get("failures", []):
            errors.append(f"rank {o.rank}: {msg}")
        if "error" in value:
            errors.append(f"rank {o.rank}: {value['error'].splitlines()[0]}")
    moved = sum(c["bytes_pulled"] for r in ranks for c in r.get("cycles", []))
    passed = _contained(cfg, ranks) if cfg.fault else not errors
    label = cfg.spec.label() + (f" [{cfg.fault.kind}]" if cfg.fault else "")
    return RefitRunResult(
        label, cfg.model_kind, cfg.transport, passed, seconds, moved, ranks, errors
    )


def _contained(cfg: RunConfig, ranks: list[dict[str, Any]]) -> bool:
    """A fault is contained when every rank ended (a clear error, or killed on purpose) and
    every receiver that failed kept its model: nothing partial or corrupted was applied."""
    assert cfg.fault is not None
    killed = cfg.fault.rank if cfg.fault.kind in ("publisher_killed", "receiver_killed") else -1
    for r in ranks:
        if r["status"] == "timeout" or r.get("failures"):
            return False
        if r["rank"] == killed:
            continue
        # a slow rank within the deadline is no failure; anything else must surface as one
        if "error" not in r and cfg.fault.kind != "slow_rank":
            return False
        if r["role"] == "receiver" and r.get("digest_unchanged") is False:
            return False
    return True


# ---- planning only -------------------------------------------------------------------------


def plan_topology(
    spec: TopologySpec,
    model_kind: str = "llama",
    model_spec: TinyModelSpec | None = None,
    *,
    threads: int = 8,
) -> dict[str, Any]:
    """Planning-only mode for large topologies (e.g. 256 trainer ranks): every rank is a thread,
    the registry a HashStore, and no byte moves. Trainers publish real manifests; each receiver
    rank discovers the version, plans its slices and proves coverage (fail closed).

    Returns counts and, per receiver rank, the bytes its plan would pull.
    """
    from concurrent.futures import ThreadPoolExecutor

    from mx_reference.refit.descriptors import make_manifest
    from mx_reference.refit.planner import plan_refit
    from mx_reference.refit.publisher import Endpoint, arena_offsets, encode_endpoint

    model = version_model(model_kind, model_spec, 1)
    mcfg = RefitModelConfig.from_hf(model.config)
    state = model.state_dict()
    registry = VersionRegistry(dist.HashStore(), timeout=30.0)

    def trainer(rank: int) -> None:
        info = spec.rank_info(rank)
        descs = [d for d, _ in rank_shards(state, mcfg, info)]
        offsets, _ = arena_offsets(descs)
        endpoint = Endpoint(transport_metadata=b"", base_addr=0, source_id=f"plan-{rank}")
        registry.publish(
            make_manifest(
                MODEL_ID,
                1,
                [msgspec.structs.replace(d, offset=offsets[d.name]) for d in descs],
                tp=(info.tp_rank, info.tp_size),
                pp=(info.pp_rank, info.pp_size),
                ep=(info.ep_rank, info.ep_size),
                agent_metadata=encode_endpoint(endpoint),
            )
        )

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


# ---- torchrun entry point ------------------------------------------------------------------


@dataclass(frozen=True)
class EnvStore:
    """Connects to the store torchrun set up (see :func:`mx_sim.ranks.store_from_env`)."""

    timeout_s: float = 60.0

    def connect(self) -> dist.Store:
        return store_from_env("mx_sim/refit", self.timeout_s)[0]


def main(argv: list[str] | None = None) -> int:
    """One rank under torchrun: ``WORLD_SIZE`` must equal the topology's world size."""
    p = argparse.ArgumentParser(prog="python -m mx_sim.refit_sim")
    p.add_argument("--model", default="llama")
    for flag in (
        "trainer-tp",
        "trainer-pp",
        "trainer-ep",
        "inference-tp",
        "inference-pp",
        "replicas",
    ):
        p.add_argument(f"--{flag}", type=int, default=1)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--transport", choices=("sim", "nixl"), default="sim")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    spec = TopologySpec(
        trainer_tp=args.trainer_tp,
        trainer_pp=args.trainer_pp,
        trainer_ep=args.trainer_ep,
        inference_tp=args.inference_tp,
        inference_pp=args.inference_pp,
        replicas=args.replicas,
    )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != spec.world_size:
        raise ValueError(f"WORLD_SIZE={world} but topology {spec.label()} needs {spec.world_size}")
    cfg = replace(
        RunConfig(spec, args.model, cycles=args.cycles, transport=args.transport),
        timeout_s=args.timeout,
    )
    result = rank_main(rank, cfg, EnvStore(args.timeout))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=2, default=str))
    return 1 if result.get("error") or result.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
