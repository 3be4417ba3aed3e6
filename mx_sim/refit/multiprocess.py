"""The multi-process refit simulator: every rank of a topology is a real process.

Trainer ranks (:class:`~mx_sim.refit.ranks.TrainerRank`) and receiver ranks
(:class:`~mx_sim.refit.ranks.ReceiverRank`) each run in their own process
(:mod:`mx_sim.cluster.launch`) with gloo groups (trainer TP and PP, one per receiver replica)
and a TCPStore holding the version registry. Receivers start from weights no trainer publishes,
refit each version through the reference receiver and check it: every tensor went from the
previous version A to this version B (A != B), and logits on a fixed prompt equal the trainer
model's bit for bit. With a :class:`~mx_sim.refit.faults.Fault`, a run passes when the fault is
contained (:func:`contained`).

Programmatic entry: :func:`run_topology`; the same :func:`rank_main` runs under torchrun
(:mod:`mx_sim.refit.torchrun`).
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mx_reference.refit.apply import state_digest
from mx_reference.refit.gather import vote
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.receiver import RefitError
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.replicas import ReplicaDirectory, ReplicaSource
from mx_reference.refit.shards import ShardedRefitReceiver
from mx_sim.cluster.launch import RankOutcome, gloo_group, host_store, launch
from mx_sim.cluster.topology import RankInfo, TopologySpec
from mx_sim.conformance.sharded_adapter import expected_shards
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import TinyModelSpec, VersionWeights, pp_stage, version_model
from mx_sim.refit.faults import STORE_GONE_KEY, Fault, FaultContext
from mx_sim.refit.hf_tp_engine import (
    TP_LOGITS_ATOL,
    engine_layout,
    init_replica_group,
    load_tp_model,
    save_checkpoint,
)
from mx_sim.refit.megatron_trainer import FAMILIES as MEGATRON_FAMILIES
from mx_sim.refit.megatron_trainer import (
    MegatronLogits,
    MegatronModelSpec,
    MegatronTrainer,
    megatron_available,
    post_logits,
)
from mx_sim.refit.ranks import MODEL_ID, HfSplitShards, ReceiverRank, TrainerRank, receiver_for
from mx_sim.sim_transport import TRANSPORTS, make_transport


@dataclass(frozen=True)
class RunConfig:
    """Everything every rank needs (pickled to each process)."""

    spec: TopologySpec
    model_kind: str = "llama"
    model_spec: TinyModelSpec = TinyModelSpec()
    cycles: int = 3
    transport: str = "sim"
    fault: Fault | None = None
    timeout_s: float = 20.0
    fanout: bool = False  # replica 0 republishes; the other replicas pull from it
    trainer: str = "hf-split"  # or "megatron": real Megatron-Core ranks (TRAINERS)
    engine: str = "full"  # or "hf-tp": sharded HF TP ranks (ENGINES)
    checkpoint: str = ""  # the version-0 checkpoint the hf-tp ranks load

    @property
    def weights(self) -> VersionWeights:
        return VersionWeights(self.model_kind, self.model_spec)

    def strikes(self, info: RankInfo, cycle: int) -> bool:
        return self.fault is not None and self.fault.strikes(info.global_rank, cycle)


@dataclass
class RefitRunResult:
    """One topology run: per-rank outcomes and per-cycle timing records."""

    label: str
    model_kind: str
    transport: str
    trainer: str
    engine: str
    passed: bool
    seconds: float
    bytes_moved: int
    ranks: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    model_bytes: int = 0  # one copy of the trainer's weights

    def receiver_cycles(self) -> list[list[dict[str, Any]]]:
        """Timing records per receiver rank, cycle by cycle."""
        return [r.get("cycles", []) for r in self.ranks if r["role"] == "receiver"]

    def pulled_over_model(self) -> float:
        """Bytes each replica pulled in the first cycle over the model's bytes (1.0: every
        byte once; more where KV heads or replicated tensors are held by several ranks)."""
        first = sum(cs[0]["bytes_pulled"] for cs in self.receiver_cycles() if cs)
        replicas = len({r.get("replica", 0) for r in self.ranks if r["role"] == "receiver"})
        return first / replicas / self.model_bytes if self.model_bytes else 0.0

    def logits_max_abs(self) -> float:
        """The largest logits difference any receiver saw against the trainer's."""
        return max((r.get("logits_max_abs", 0.0) for r in self.ranks), default=0.0)

    def rank_lines(self) -> list[str]:
        """One line per rank: how it ended."""
        out = []
        for r in self.ranks:
            if r["status"] != "ok":
                how = (
                    f"{r['status']}: {r.get('error', '').splitlines()[0] if r.get('error') else ''}"
                )
            elif r.get("error"):
                how = r["error"].splitlines()[0]
            else:
                how = f"ok, {len(r.get('cycles', []))} cycles" if r["role"] == "receiver" else "ok"
            out.append(f"rank {r['rank']} ({r['role']}): {how}")
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


TRAINERS = ("megatron", "hf-split")
ENGINES = ("hf-tp", "full")
HF_TP_FAMILIES = (
    "llama",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "gemma",
    "gemma2",
    "gemma3",
    "olmo2",
    "phi3",
)  # families with a transformers TP plan


def default_engine(spec: TopologySpec, kind: str, fanout: bool = False) -> str:
    """Sharded HF TP ranks wherever a replica is tensor-parallel (one PP stage, a family
    transformers shards, no fan-out: a sharded replica does not republish), else full models."""
    sharded = spec.inference_tp > 1 and spec.inference_pp == 1 and kind in HF_TP_FAMILIES
    return "hf-tp" if sharded and not fanout else "full"


def check_engine(engine: str, spec: TopologySpec, kind: str, fanout: bool) -> None:
    """``ValueError`` (one line) for an engine that cannot run this topology."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} not in {ENGINES}")
    if engine == "hf-tp":
        if kind not in HF_TP_FAMILIES:
            raise ValueError(f"engine 'hf-tp': {kind!r} has no transformers TP plan")
        if spec.inference_pp > 1 or fanout:
            raise ValueError("engine 'hf-tp': one PP stage, no fan-out")


def default_trainer(spec: TopologySpec, kind: str, model_spec: TinyModelSpec | None = None) -> str:
    """Megatron-Core wherever it runs the row here (installed, a family it runs, no EP, fp32),
    else the HF-split trainer."""
    runs = megatron_available() and kind in MEGATRON_FAMILIES
    fp32 = model_spec is None or model_spec.dtype == "float32"
    return "megatron" if runs and fp32 else "hf-split"


def check_trainer(trainer: str, spec: TopologySpec, kind: str, model_spec: TinyModelSpec) -> None:
    """``ValueError`` (one line) for a trainer that cannot run this topology, before any rank
    starts: unknown, Megatron-Core not installed, a family or mode it does not run here, or a
    layout Megatron itself refuses."""
    if trainer not in TRAINERS:
        raise ValueError(f"trainer {trainer!r} not in {TRAINERS}")
    if trainer == "hf-split":
        return
    if not megatron_available():
        raise ValueError("trainer 'megatron' needs megatron-core (pip install megatron-core)")
    if model_spec.dtype != "float32":
        raise ValueError("trainer 'megatron': runs float32 here (its CPU path has no bf16 GEMM)")
    MegatronModelSpec(kind, model_spec).check(spec.trainer_tp, spec.trainer_pp, spec.trainer_ep)


# ---- rank bodies ---------------------------------------------------------------------------


def _wait_count(store: dist.Store, key: str, want: int, abort: str, timeout_s: float) -> None:
    """Wait for counter ``key`` to reach ``want``; fail early when ``abort`` appears."""
    deadline = time.monotonic() + timeout_s
    while int(store.add(key, 0)) < want:
        if store.check([abort]):
            raise RefitError(f"receivers aborted: {store.get(abort).decode()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: {store.add(key, 0)}/{want} receivers within {timeout_s}s")
        time.sleep(0.01)


def _act(cfg: RunConfig, info: RankInfo, store: dist.Store, cycle: int) -> bool:
    """Run the fault's action if it strikes this rank now; True: skip this cycle's publish."""
    if not cfg.strikes(info, cycle) or cfg.fault is None or cfg.fault.entry.act is None:
        return False
    return cfg.fault.entry.act(FaultContext(store, cfg.timeout_s, cfg.fault.delay_s))


def _trainer(cfg: RunConfig, info: RankInfo, store: dist.Store, groups: dict) -> dict[str, Any]:
    registry = VersionRegistry(store, timeout=cfg.timeout_s)
    plan = cfg.fault.transport_plan(info.global_rank) if cfg.fault is not None else None
    agent = make_transport(cfg.transport, _name(info), faults=plan)
    megatron = None
    if cfg.trainer == "megatron":
        megatron = MegatronTrainer(info, cfg.model_kind, cfg.model_spec, store, cfg.timeout_s)
    source = megatron or HfSplitShards(cfg.weights, info)
    rank = TrainerRank(info, registry, agent, source)
    try:
        for cycle in range(1, cfg.cycles + 1):
            if megatron is not None:  # every trainer rank steps and runs the oracle forward
                megatron.advance_to(cycle)
                logits = megatron.logits()
                if logits is not None and info.tp_rank == 0:
                    post_logits(store, cycle, logits)
            if not _act(cfg, info, store, cycle):
                rank.publish(cycle)
            # the whole TP group learns whether every member published
            if not vote(True, groups.get("tp")):
                raise RefitError(f"v{cycle}: a trainer TP peer failed to publish")
            abort = f"abort/v{cycle}"
            _wait_count(store, f"done/v{cycle}", cfg.spec.num_receivers, abort, cfg.timeout_s)
            if cycle > 1:
                rank.retire(cycle - 1)
        return {"cycles": [], "published": rank.publisher.stats.versions_published}
    finally:
        rank.close()


def _receiver(cfg: RunConfig, info: RankInfo, store: dist.Store, groups: dict) -> dict[str, Any]:
    registry = VersionRegistry(store, timeout=cfg.timeout_s)
    root = cfg.fanout and info.replica == 0
    serves = root and info.tp_rank == 0 and info.pp_rank == 0
    agent = make_transport(cfg.transport, _name(info), serves=serves)
    directory = ReplicaDirectory(registry, MODEL_ID)
    target = TargetLayout(tp_size=info.tp_size, tp_rank=info.tp_rank)
    oracle: Any = cfg.weights
    if cfg.trainer == "megatron":
        oracle = MegatronLogits(store)
    common = dict(
        registry=registry,
        transport=agent,
        target=target,
        timeout_s=cfg.timeout_s,
        backend=CpuMockBackend(),
        directory=directory,
    )
    if cfg.engine == "hf-tp":
        group = init_replica_group(store, info.replica, info.tp_rank, info.tp_size, cfg.timeout_s)
        model = load_tp_model(Path(cfg.checkpoint), info.tp_size)
        local, layout, meta = engine_layout(model, info.tp_size)
        receiver = receiver_for(
            model,
            make=ShardedRefitReceiver,
            group=group,
            layout=layout,
            local=local,
            meta=meta,
            **common,
        )
        rank = ReceiverRank(
            receiver,
            model,
            oracle,
            local=local,
            cut=lambda full: expected_shards(model, layout, full),
            logits_atol=TP_LOGITS_ATOL[cfg.model_spec.dtype],
        )
    else:
        model = version_model(cfg.model_kind, cfg.model_spec, 0)
        num_layers = cfg.weights.model_config.num_layers
        receiver = receiver_for(
            model,
            prefer_replicas=cfg.fanout and not root,
            group=groups.get("replica"),
            owns=lambda name: pp_stage(name, num_layers, info.pp_size) == info.pp_rank,
            **common,
        )
        rank = ReceiverRank(receiver, model, oracle)
    source = ReplicaSource(receiver, directory, agent, backend=CpuMockBackend()) if serves else None
    cycles, failures = [], []
    try:
        for cycle in range(1, cfg.cycles + 1):
            _act(cfg, info, store, cycle)
            if cfg.fanout and not root:
                store.wait([f"replica_ready/v{cycle}"])
            digest = state_digest(rank.local)
            try:
                timing, problems = rank.cycle(cycle)
            except (RefitError, TimeoutError, RuntimeError) as exc:
                _try_abort(store, cycle, f"rank {info.global_rank}: {exc}")
                return {
                    "cycles": cycles,
                    "error": f"{type(exc).__name__}: {exc}",
                    "digest_unchanged": state_digest(rank.local) == digest,
                    "failed_cycle": cycle,
                }
            failures += problems
            cycles.append(timing.to_json())
            if source is not None:
                source.republish()
                store.set(f"replica_ready/v{cycle}", b"1")
            store.add(f"done/v{cycle}", 1)
        if source is not None:  # followers may still be reading the last version served
            last = f"done/v{cfg.cycles}"
            _wait_count(store, last, cfg.spec.num_receivers, f"abort/v{cfg.cycles}", cfg.timeout_s)
        held = sum(t.numel() * t.element_size() for t in rank.local.values())
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage() for t in rank.local.values()
        }
        return {
            "storage_bytes": sum(s.nbytes() for s in storages.values()),
            "cycles": cycles,
            "failures": failures,
            "logits_max_abs": rank.logits_error,
            "logits_atol": rank.atol,
            "local_bytes": held,
        }
    finally:
        if source is not None:
            source.close()
        receiver.close()
        agent.close()


def _try_abort(store: dist.Store, cycle: int, reason: str) -> None:
    try:
        store.set(f"abort/v{cycle}", reason.encode())
    except RuntimeError:  # the store itself may be the fault
        pass


def _name(info: RankInfo) -> str:
    return f"{info.role}{info.global_rank}-{uuid.uuid4().hex[:6]}"


def rank_main(rank: int, cfg: RunConfig, addr: Any) -> dict[str, Any]:
    """One rank of a run; ``addr.connect()`` gives the run's store."""
    store = addr.connect()
    info = cfg.spec.rank_info(rank)
    result: dict[str, Any] = {
        "rank": rank,
        "role": info.role,
        "tp_rank": info.tp_rank,
        "replica": info.replica,
    }
    try:
        groups = {
            kind: gloo_group(store, cfg.spec.group_name(members), members, rank, cfg.timeout_s)
            for kind, members in cfg.spec.groups_of(rank).items()
            if len(members) > 1
        }
        body = _trainer if info.role == "trainer" else _receiver
        result.update(body(cfg, info, store, groups))
    except Exception as exc:  # a clear error per rank, reported, never a hang
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


# ---- the parent ----------------------------------------------------------------------------


def run_topology(
    spec: TopologySpec,
    model_kind: str = "llama",
    cycles: int = 3,
    transport: str = "sim",
    fault: Fault | None = None,
    out_dir: Path | None = None,
    *,
    model_spec: TinyModelSpec | None = None,
    fanout: bool = False,
    trainer: str = "hf-split",
    engine: str | None = None,
    timeout_s: float = 20.0,
    deadline_s: float = 120.0,
) -> RefitRunResult:
    """Run ``spec`` for ``cycles`` refit cycles in real processes; never hangs past
    ``deadline_s``. With a ``fault``, ``passed`` means it was contained (:func:`contained`)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r} not in {TRANSPORTS}")
    if fault is not None:
        fault.check_rank(spec)
    model_spec = model_spec or TinyModelSpec()
    check_trainer(trainer, spec, model_kind, model_spec)
    engine = engine or default_engine(spec, model_kind, fanout)
    check_engine(engine, spec, model_kind, fanout)
    with tempfile.TemporaryDirectory(prefix="mx-ckpt-") as tmp:
        checkpoint = (
            str(save_checkpoint(model_kind, model_spec, Path(tmp))) if engine == "hf-tp" else ""
        )
        cfg = RunConfig(
            spec,
            model_kind,
            model_spec,
            cycles,
            transport,
            fault,
            timeout_s,
            fanout,
            trainer,
            engine,
            checkpoint,
        )
        return _run(cfg, out_dir, deadline_s)


def _run(cfg: RunConfig, out_dir: Path | None, deadline_s: float) -> RefitRunResult:
    spec, fault, timeout_s = cfg.spec, cfg.fault, cfg.timeout_s
    master, addr = host_store(f"run-{uuid.uuid4().hex[:8]}", timeout_s)
    holder: dict[str, Any] = {"store": dist.PrefixStore(addr.prefix, master)}
    del master  # ``holder`` keeps the only reference: dropping it shuts the server down

    def on_poll() -> None:  # the store_gone fault asks the parent to shut the store down
        if holder["store"] is not None and fault is not None and fault.kind == "store_gone":
            if holder["store"].check([STORE_GONE_KEY]):
                holder["store"] = None

    start = time.perf_counter()
    outcomes = launch(
        rank_main, spec.world_size, (cfg, addr), timeout_s=deadline_s, on_poll=on_poll
    )
    holder["store"] = None
    result = summarize(cfg, outcomes, time.perf_counter() - start)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        default = TinyModelSpec()
        sizes = "".join(  # rows differing only in model sizes get files of their own
            f"-{k}{v}" for k, v in asdict(cfg.model_spec).items() if v != getattr(default, k)
        )
        name = f"refit-{spec.label().replace('>', '')}-{cfg.model_kind}{sizes}.json"
        (out_dir / name).write_text(json.dumps(result.to_json(), indent=2, default=str))
    return result


def summarize(cfg: RunConfig, outcomes: list[RankOutcome], seconds: float) -> RefitRunResult:
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
    passed = contained(cfg.fault, ranks) if cfg.fault else not errors
    label = cfg.spec.label() + (f" [{cfg.fault.kind}]" if cfg.fault else "")
    return RefitRunResult(
        label,
        cfg.model_kind,
        cfg.transport,
        cfg.trainer,
        cfg.engine,
        passed,
        seconds,
        moved,
        ranks,
        errors,
        sum(t.numel() * t.element_size() for t in cfg.weights.params(1).values()),
    )


def contained(fault: Fault, ranks: list[dict[str, Any]]) -> bool:
    """A fault is contained when every rank ended (a clear error, or killed on purpose), the
    errors say what the fault's entry expects, and every receiver that failed kept its model:
    nothing partial or corrupted was applied."""
    entry = fault.entry
    errors = []
    for r in ranks:
        if r["status"] == "timeout" or r.get("failures"):
            return False
        if entry.kills and r["rank"] == fault.rank:
            continue
        if "error" in r:
            errors.append(r["error"])
        elif not entry.may_finish:
            return False  # every rank must surface the fault as a clear error
        if r["role"] == "receiver" and r.get("digest_unchanged") is False:
            return False
    return not entry.error or any(entry.error in e for e in errors)
