"""Our refit against the ways RL frameworks sync weights today, side by side in one run.

A trainer process holds new weights of an fp32 HF Llama; an inference process must end up holding
them. The methods (:data:`METHODS`) move the same bytes: our refit over real NIXL and over the
simulated transport, the trainer's publish included (also at mixed TP 2->1, and 1->2 and 2->4
into vLLM-shaped sharded ranks); gloo broadcasts, per tensor and bucketed; safetensors through
/dev/shm; one NIXL read; and ``copy_`` in one process, the limit every ratio is taken against.

Every repetition of every method runs in fresh processes (:func:`mx_sim.cluster.launch.launch`),
so one method's buffers never inflate another's memory; repetitions go round-robin over the
methods so that all of them see the same machine load. In each repetition version 1 is a cold
update and version 2, the trainer's weights after one step, is the warm update that is timed
(receiving side, from a barrier until it holds the weights) and then checked with
``torch.equal`` for every tensor; a method that fails the check is reported failed, not timed.
Peak RSS is that of the warm update (the high-water mark is reset before it), per process.

Writes ``peers.json`` and ``peers.png`` (grouped bars, x ``copy_``); :func:`page_section` is
the section of docs/performance.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mx_reference.refit.apply import model_parameters
from mx_reference.refit.name_maps import RefitModelConfig
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.shards import ShardedRefitReceiver
from mx_reference.transport import MemDesc
from mx_sim.bench.refit import SPAN_BYTES
from mx_sim.cluster.launch import StoreAddress, gloo_group, host_store, launch
from mx_sim.cluster.topology import TopologySpec
from mx_sim.conformance.sharded_adapter import cut, vllm_shard
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import TinyModelSpec, rank_shards, version_model
from mx_sim.plots import grouped_bars
from mx_sim.refit.ranks import TrainerRank, packed_shards, receiver_for
from mx_sim.report import BenchResult
from mx_sim.sim_transport import make_transport

KIND = "llama"
STEP = 1 / 128  # the trainer's step between versions: every weight moves, so every tensor changes
METHODS = {
    "refit_nixl": "our refit over NIXL (publish + receiver cycle)",
    "refit_nixl_in_place": "our refit over NIXL, published in place (no arena copy)",
    "refit_sim": "our refit over the simulated transport (publish + receiver cycle)",
    "bcast_tensor": "per-tensor gloo broadcast + `copy_` (verl / OpenRLHF / NeMo-RL "
    "`update_weights_from_distributed`)",
    "bcast_bucket": "one bucketed gloo broadcast (flatten, broadcast, `copy_` out)",
    "safetensors": "safetensors `save_file` to /dev/shm + `load_file` + `copy_`",
    "nixl_read": "one NIXL read of one buffer of the same bytes, cross-process",
    "copy": "`torch` `copy_` of the same bytes, one process (the limit)",
}
PHASES = ("publish", "pull", "verify", "apply")  # where our refit's time goes, in the page
# per process: the peak RSS, and the peak above the runtime alone, over the bytes the process
# holds (a TP rank: its shards); the largest rank
RSS_KEYS = tuple(f"rss_{k}_{r}_x" for k in ("peak", "added") for r in ("trainer", "receiver"))


@dataclass(frozen=True)
class PeersConfig:
    """The benchmark's knobs: model sizes, repetitions, methods, mixed-TP rows, deadline."""

    sizes_mib: tuple[int, ...] = (256, 1024)
    reps: int = 5
    methods: tuple[str, ...] = tuple(METHODS)
    # (trainer, inference) TP, NIXL refit; an inference TP over 1 is a vLLM-shaped sharded rank
    mixed_tp: tuple[tuple[int, int], ...] = ((2, 1), (1, 2), (2, 4))
    timeout_s: float = 300.0  # a repetition's deadline; also every wait inside it

    def cases(self) -> list[Case]:
        cases = [Case(m) for m in self.methods]
        if "refit_nixl" in self.methods:
            cases += [Case("refit_nixl", t, i) for t, i in self.mixed_tp]
        return cases


QUICK = PeersConfig(sizes_mib=(32,), reps=3, timeout_s=120.0)


@dataclass(frozen=True)
class Case:
    """One row of the table: a method, at a trainer -> inference TP."""

    method: str
    trainer_tp: int = 1
    inference_tp: int = 1

    @property
    def topology(self) -> TopologySpec:
        return TopologySpec(trainer_tp=self.trainer_tp, inference_tp=self.inference_tp)

    @property
    def label(self) -> str:
        mixed = (self.trainer_tp, self.inference_tp) != (1, 1)
        return f"{self.method} {self.topology.label()}" if mixed else self.method

    @property
    def key(self) -> str:  # metric names: refit_nixl_tp2_tp1
        return self.label.lower().replace(" ", "_").replace("->", "_")

    @property
    def world(self) -> int:
        return 1 if self.method == "copy" else self.topology.world_size


GOALS = {Case("refit_nixl"): 3.0, Case("refit_nixl", 2, 1): 4.0}  # issue 19, x copy_


def model_spec(mib: int) -> TinyModelSpec:
    """A wide fp32 Llama of about ``mib`` MiB, 8 heads, 4 KV heads (1 GiB: 21 layers, 192
    tensors)."""
    hidden = 1024 if mib >= 128 else 256 if mib >= 16 else 128
    inter, vocab, kv = hidden * 11 // 4, hidden * 8, hidden // 2
    # parameters: q and o [H, H], k and v [kv, H], gate and up [I, H], down [H, I], 2 norms [H]
    layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * inter * hidden + 2 * hidden
    embed = 2 * vocab * hidden + hidden  # embed_tokens and lm_head [V, H], the final norm [H]
    layers = max(1, round((mib * 2**20 / 4 - embed) / layer))
    return TinyModelSpec(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=8, num_kv_heads=4,
    )  # fmt: skip


# ---- the weights, flat buffers, memory -----------------------------------------------------


def _step(tensors) -> None:
    """The trainer's step from one version to the next (the oracle takes the same step)."""
    with torch.no_grad():
        for t in tensors:
            t.add_(STEP)


def _steps(tensors: list[torch.Tensor]) -> Callable[[int], None]:
    """A ``prepare``: from version 2 on, ``tensors`` take one step first."""
    return lambda version: _step(tensors) if version > 1 else None


def trainer_params(spec: TinyModelSpec) -> dict[str, torch.Tensor]:
    """Version 1: the fixture's trainer weights at version 1 (parameters only, no module)."""
    return {n: p.detach() for n, p in model_parameters(version_model(KIND, spec, 1)).items()}


def expected(spec: TinyModelSpec) -> dict[str, torch.Tensor]:
    """Version 2, what every receiving process must hold after the warm update."""
    params = trainer_params(spec)
    _step(params.values())
    return params


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _pack(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every tensor, flattened into one new buffer: (total numel,) of their dtype."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def _unpack(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped as ``like``'s tensors, in their order."""
    out, at = {}, 0
    for name, t in like.items():
        out[name] = flat[at : at + t.numel()].view(t.shape)
        at += t.numel()
    return out


def _reset_peak_rss() -> None:
    """Start a new RSS high-water mark here (Linux; elsewhere the process's peak stands)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- one process of one repetition ---------------------------------------------------------


@dataclass
class Side:
    """What one process does in a method: ``prepare(v)`` (untimed), ``update(v)`` (timed), and
    on a receiving process, ``received(like)``: the tensors it holds after the update, and
    ``holds(full)``: which tensors those must be, given the full weights (a TP rank's slices)."""

    update: Callable[[int], None]
    prepare: Callable[[int], None] = lambda version: None
    received: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None
    holds: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] = lambda full: full


class Rank:
    """One process of a repetition: its role, the repetition's store and the gates ranks meet
    at (``arrive`` counts ranks in; ``wait`` returns once all ``n`` have)."""

    def __init__(self, rank: int, case: Case, spec: TinyModelSpec, addr: StoreAddress):
        self.rank, self.case, self.spec = rank, case, spec
        self.addr, self.store, self.timeout_s = addr, addr.connect(), addr.timeout_s
        self.info = case.topology.rank_info(rank)
        self.role = self.info.role if case.world > 1 else "receiver"  # copy_: one process
        self.tag = f"{addr.prefix.replace('/', '-')}-{self.role}{rank}"
        self.extra: dict[str, Any] = {}  # reported besides the seconds (publish, phases)

    def arrive(self, key: str, n: int) -> None:
        if self.store.add(key, 1) == n:
            self.store.set(f"{key}/all", b"1")

    def wait(self, key: str) -> None:
        self.store.wait([f"{key}/all"])

    def barrier(self, key: str) -> None:
        self.arrive(key, self.case.world)
        self.wait(key)


def _rank_main(rank: int, case: Case, spec: TinyModelSpec, addr: StoreAddress) -> dict[str, Any]:
    if case.world > (os.cpu_count() or 1):
        # more ranks than cores: one intra-op thread each (torchrun's OMP_NUM_THREADS=1), as
        # OpenMP barriers spin while other ranks hold the cores. With no more ranks than cores
        # they mostly take turns (publish, pull, apply) and keep torch's default.
        torch.set_num_threads(1)
    ctx, base = Rank(rank, case, spec, addr), _rss()  # the runtime alone: torch, transformers
    with contextlib.ExitStack() as stack:
        side = SETUPS[case.method](ctx, stack)
        for version in (1, 2):  # cold, then the warm update that is timed
            side.prepare(version)
            if version == 2:
                _reset_peak_rss()
            ctx.barrier(f"go/{version}")
            start = time.perf_counter()
            side.update(version)
            seconds = time.perf_counter() - start
        peak = _peak_rss()
        out = {"role": ctx.role, "seconds": seconds, "rss_peak": peak, "rss_added": peak - base}
        out.update(rss_base=base, **ctx.extra)
        if side.received is not None:
            full = expected(spec)
            want = side.holds(full)
            got = side.received(want)
            out.update(model_bytes=_nbytes(full.values()), held_bytes=_nbytes(want.values()))
            out["tensors"] = len(want)
            out["problems"] = [n for n in want if n not in got or not torch.equal(got[n], want[n])]
    return out


# ---- the methods: each returns this process's Side -----------------------------------------


def _refit(transport: str, in_place: bool = False) -> Callable[[Rank, contextlib.ExitStack], Side]:
    def setup(ctx: Rank, stack: contextlib.ExitStack) -> Side:
        topo, info = ctx.case.topology, ctx.info
        registry = VersionRegistry(ctx.store, timeout=ctx.timeout_s)
        if ctx.role == "trainer":
            model = version_model(KIND, ctx.spec, 1)
            params = {n: p.detach() for n, p in model_parameters(model).items()}
            layout = RefitModelConfig.from_hf(model.config)
            ready: dict[int, list] = {}  # this rank's Megatron shards, cut before the timing
            agent = make_transport(transport, ctx.tag)
            source = SimpleNamespace(shards=ready.get)
            # signing later: receivers pull while the trainer hashes what it published
            rank = TrainerRank(info, registry, agent, source=source, sign_later=True)
            stack.callback(rank.close)

            def prepare(version: int) -> None:
                if version == 1:
                    shards = rank_shards(params, layout, tp=(info.tp_rank, info.tp_size))
                    ready[1] = packed_shards(shards) if in_place else shards
                    ctx.extra["held_bytes"] = _nbytes(t for _, t in ready[1])
                    params.clear()  # the shards are the trainer's parameters, as on a Megatron rank
                    return
                if in_place:  # the trainer is about to write the storage it published
                    rank.publisher.begin_write(readers=topo.num_receivers)
                rank.retire(version - 1)  # the receivers are done: its arena is reused
                ready[version] = ready.pop(version - 1)
                _step([t for _, t in ready[version]])

            def publish(version: int) -> None:
                start = time.perf_counter()
                rank.publish(version, in_place=in_place)
                ctx.extra["publish_s"] = time.perf_counter() - start
                ctx.arrive(f"published/{version}", topo.num_trainers)
                ctx.wait(f"done/{version}")

            return Side(publish, prepare)
        agent = stack.enter_context(make_transport(transport, ctx.tag, serves=False))
        model = version_model(KIND, ctx.spec, 0)
        members = topo.replica_group(info.replica)
        group = (
            gloo_group(ctx.store, "replica", members, info.global_rank, ctx.timeout_s)
            if len(members) > 1
            else None
        )
        wiring: dict[str, Any] = dict(
            registry=registry, transport=agent, timeout_s=ctx.timeout_s,
            target=TargetLayout(tp_size=info.tp_size, tp_rank=info.tp_rank),
            backend=CpuMockBackend(), group=group,
        )  # fmt: skip
        if info.tp_size > 1:  # a vLLM-shaped rank: it holds, and pulls, its slices only
            engine = vllm_shard(model, info.tp_size, info.tp_rank)
            wiring.update(layout=engine.layout, local=engine.local, meta=engine.meta)
            # a row-parallel slice is one span a row: shorter ones read whole shards to scratch
            wiring.update(min_span_bytes=SPAN_BYTES)
            receiver = receiver_for(engine.model, make=ShardedRefitReceiver, **wiring)
            received = lambda like: engine.local  # noqa: E731
            holds = lambda full: {n: cut(full, p) for n, p in engine.layout.items()}  # noqa: E731
        else:
            receiver = receiver_for(model, **wiring)
            received, holds = lambda like: model_parameters(model), Side.holds
        stack.callback(receiver.close)

        def refit(version: int) -> None:
            ctx.wait(f"published/{version}")
            ctx.extra["phases"] = receiver.refit(version).to_json()
            ctx.arrive(f"done/{version}", topo.num_receivers)

        return Side(refit, received=received, holds=holds)

    return setup


def _broadcast(bucketed: bool) -> Callable[[Rank, contextlib.ExitStack], Side]:
    def setup(ctx: Rank, stack: contextlib.ExitStack) -> Side:
        group = gloo_group(ctx.store, "peers", [0, 1], ctx.rank, ctx.timeout_s)
        if ctx.role == "trainer":
            params = trainer_params(ctx.spec)

            def send(version: int) -> None:
                for t in [_pack(params)] if bucketed else params.values():
                    group.broadcast(t, 0).wait()

            return Side(send, _steps(list(params.values())))
        params = model_parameters(version_model(KIND, ctx.spec, 0))

        @torch.no_grad()
        def receive(version: int) -> None:
            if bucketed:
                flat = torch.empty(sum(p.numel() for p in params.values()))  # (numel,) fp32
                group.broadcast(flat, 0).wait()
                for name, t in _unpack(flat, params).items():
                    params[name].copy_(t)
                return
            for p in params.values():
                t = torch.empty_like(p)
                group.broadcast(t, 0).wait()
                p.copy_(t)

        return Side(receive, received=lambda like: params)

    return setup


def _safetensors(ctx: Rank, stack: contextlib.ExitStack) -> Side:
    from safetensors.torch import load_file, save_file

    path = _checkpoint(ctx.addr)
    if ctx.role == "trainer":
        params = trainer_params(ctx.spec)

        def save(version: int) -> None:
            save_file(params, path)
            ctx.arrive(f"saved/{version}", 1)
            ctx.wait(f"loaded/{version}")

        return Side(save, _steps(list(params.values())))
    params = model_parameters(version_model(KIND, ctx.spec, 0))

    @torch.no_grad()
    def load(version: int) -> None:
        ctx.wait(f"saved/{version}")
        for name, t in load_file(path).items():
            params[name].copy_(t)
        ctx.arrive(f"loaded/{version}", 1)

    return Side(load, received=lambda like: params)


def _checkpoint(addr: StoreAddress) -> Path:
    """The repetition's safetensors file (the parent removes it when the repetition ends)."""
    return Path("/dev/shm") / f"mx-peers-{addr.prefix.replace('/', '-')}.safetensors"


def _nixl_read(ctx: Rank, stack: contextlib.ExitStack) -> Side:
    agent = stack.enter_context(make_transport("nixl", ctx.tag, serves=ctx.role == "trainer"))
    if ctx.role == "trainer":
        flat = _pack(trainer_params(ctx.spec))  # (numel,) fp32
        agent.register([flat])
        ctx.store.set("source", json.dumps([flat.data_ptr(), flat.numel()]))
        ctx.store.set("metadata", agent.metadata())  # type: ignore[arg-type]  # bytes work too
        return Side(lambda version: ctx.wait(f"read/{version}"), _steps([flat]))
    addr, numel = json.loads(ctx.store.get("source"))
    dst = torch.zeros(numel)  # (numel,) fp32
    agent.register([dst])
    peer = agent.add_remote(ctx.store.get("metadata"))
    handle = agent.make_read([(dst, MemDesc(addr, numel * dst.element_size()).on(peer))])

    def read(version: int) -> None:
        agent.post(handle)
        agent.wait(handle, ctx.timeout_s)
        ctx.arrive(f"read/{version}", 1)

    return Side(read, received=lambda like: _unpack(dst, like))


def _copy(ctx: Rank, stack: contextlib.ExitStack) -> Side:
    src = _pack(trainer_params(ctx.spec))  # (numel,) fp32
    dst = torch.empty_like(src)
    return Side(lambda version: dst.copy_(src), _steps([src]), lambda like: _unpack(dst, like))


SETUPS: dict[str, Callable[[Rank, contextlib.ExitStack], Side]] = {
    "refit_nixl": _refit("nixl"),
    "refit_sim": _refit("sim"),
    "refit_nixl_in_place": _refit("nixl", in_place=True),
    "bcast_tensor": _broadcast(bucketed=False),
    "bcast_bucket": _broadcast(bucketed=True),
    "safetensors": _safetensors,
    "nixl_read": _nixl_read,
    "copy": _copy,
}


# ---- the parent: repetitions, medians, outputs ---------------------------------------------


def repetition(case: Case, spec: TinyModelSpec, addr: StoreAddress) -> dict[str, Any]:
    """One repetition of ``case`` in fresh processes: its seconds, phases and peak RSS, or the
    ``error`` that keeps it out of the timings."""
    outcomes = launch(_rank_main, case.world, (case, spec, addr), timeout_s=addr.timeout_s)
    _checkpoint(addr).unlink(missing_ok=True)  # a killed safetensors rank leaves it behind
    for o in outcomes:
        if o.status != "ok":
            first = next((line for line in (o.error or "").splitlines() if line.strip()), "")
            return {"error": f"rank {o.rank} {o.status}: {first}"}
    ranks = [o.value for o in outcomes]
    wrong = [n for r in ranks for n in r.get("problems", [])]
    if wrong:
        return {"error": f"not verified: {len(wrong)} tensors differ, e.g. {wrong[0]}"}
    receivers = [r for r in ranks if r["role"] == "receiver"]
    slowest = max(receivers, key=lambda r: r["seconds"])
    out = {"seconds": slowest["seconds"], "model_bytes": slowest["model_bytes"]}
    out.update(tensors=slowest["tensors"], phases=slowest.get("phases", {}))
    out["rss_base_mb"] = max(r["rss_base"] for r in ranks) / 2**20
    if "publish_s" in ranks[0]:
        out["phases"]["publish"] = max(r["publish_s"] for r in ranks if r["role"] == "trainer")
    for kind in ("peak", "added"):
        for role in ("trainer", "receiver"):
            # a rank's RSS over the bytes it holds: a trainer's default, the full model
            mine = [
                r[f"rss_{kind}"] / r.get("held_bytes", out["model_bytes"])
                for r in ranks
                if r["role"] == role
            ]
            out[f"rss_{kind}_{role}_x"] = max(mine, default=None)
    return out


def summarize(case: Case, reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of a case's repetitions, or its first error."""
    row: dict[str, Any] = {"case": case.label, "method": case.method, "key": case.key}
    row.update(trainer_tp=case.trainer_tp, inference_tp=case.inference_tp)
    errors = [r["error"] for r in reps if "error" in r]
    if errors:
        return {**row, "verified": False, "error": errors[0]}

    phases = sorted({p for r in reps for p in r["phases"] if isinstance(r["phases"][p], float)})
    return {
        **row,
        "verified": True,
        "seconds": statistics.median(r["seconds"] for r in reps),
        "reps_s": [r["seconds"] for r in reps],
        "phases": {p: statistics.median(r["phases"].get(p, 0.0) for r in reps) for p in phases},
        **{k: None if reps[0][k] is None else max(r[k] for r in reps) for k in RSS_KEYS},
        "rss_base_mb": statistics.median(r["rss_base_mb"] for r in reps),
        "model_bytes": reps[0]["model_bytes"],
        "tensors": reps[0]["tensors"],
    }


def measure_size(
    mib: int, cases: list[Case], cfg: PeersConfig, addr: StoreAddress, log: Callable[[str], None]
) -> dict[str, Any]:
    """Every case at one model size, repetitions round-robin over the cases."""
    spec = model_spec(mib)
    reps: dict[Case, list[dict[str, Any]]] = {c: [] for c in cases}
    for rep in range(cfg.reps):
        log(f"[mx-sim bench]   peers {mib} MiB: repetition {rep + 1}/{cfg.reps}")
        for i, case in enumerate(cases):
            scoped = dataclasses.replace(addr, prefix=f"{addr.prefix}/{mib}/{rep}/{i}")
            reps[case].append(repetition(case, spec, scoped))
    rows = [summarize(c, reps[c]) for c in cases]
    copy_s = next((r["seconds"] for r in rows if r["case"] == "copy" and r["verified"]), None)
    for r in rows:
        if r["verified"] and copy_s:
            r["x_copy"] = r["seconds"] / copy_s
    model_bytes = next((r["model_bytes"] for r in rows if r["verified"]), 0)
    return {"mib": mib, "model_bytes": model_bytes, "spec": dataclasses.asdict(spec), "rows": rows}


def bench_result(size: dict[str, Any], reps: int) -> BenchResult:
    rows = {r["case"]: r for r in size["rows"]}
    goals = {f"{c.key}_x_copy": f"<= {g:g} x copy_ (issue 19)" for c, g in GOALS.items()}
    met = all(rows.get(c.label, {}).get("x_copy", float("inf")) <= g for c, g in GOALS.items())
    metrics: dict[str, float] = {"model_mbytes": size["model_bytes"] / 1e6}
    for r in size["rows"]:
        if "x_copy" in r:
            metrics[f"{r['key']}_s"] = r["seconds"]
            metrics[f"{r['key']}_x_copy"] = r["x_copy"]
    failed = [f"{r['case']}: {r['error']}" for r in size["rows"] if not r["verified"]]
    return BenchResult(
        f"peers {size['mib']} MiB (warm update, trainer -> inference)",
        metrics,
        goals=goals,
        met=met,
        notes=f"median of {reps}, methods interleaved, fresh processes per repetition; every "
        "method verified with torch.equal; table in the peers section"
        + "".join(f"; FAILED {f}" for f in failed),
    )


def plot(sizes: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: one group per model size, one bar per case, in multiples of ``copy_``."""
    cases = list(dict.fromkeys(r["case"] for s in sizes for r in s["rows"]))
    series = {
        case: [
            next((r.get("x_copy", 0.0) for r in s["rows"] if r["case"] == case), 0.0) for s in sizes
        ]
        for case in cases
    }
    grouped_bars(
        path,
        "warm weight update, trainer process -> inference process",
        [size_label(s["mib"]) for s in sizes],
        series,
        "x torch copy_ of the same bytes (median)",
    )


def size_label(mib: int) -> str:
    return f"{mib >> 10} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def run(out_dir: Path, quick: bool, config: PeersConfig | None = None) -> list[BenchResult]:
    from mx_reference.transport.nixl import nixl_available

    cfg = config or (QUICK if quick else PeersConfig())
    cases = [c for c in cfg.cases() if nixl_available() or "nixl" not in c.method]
    out_dir.mkdir(parents=True, exist_ok=True)
    master, addr = host_store(f"peers-{uuid.uuid4().hex[:8]}", cfg.timeout_s)
    try:
        sizes = [measure_size(mib, cases, cfg, addr, print) for mib in cfg.sizes_mib]
    finally:
        del master  # the store's server goes with it
    plot(sizes, out_dir / "peers.png")
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__}
    data = {"config": dataclasses.asdict(cfg), "machine": machine, "sizes": sizes}
    (out_dir / "peers.json").write_text(json.dumps(data, indent=2))
    return [bench_result(s, cfg.reps) for s in sizes]


def page_section(out_dir: Path, page: Path) -> str:
    """The peers section of docs/performance.md: :func:`mx_sim.bench.peers_page.page_section`."""
    from mx_sim.bench.peers_page import page_section as section  # it imports this module

    return section(out_dir, page)
