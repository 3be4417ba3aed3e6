"""Conformance checks: refit.sharded_* (engines whose ranks hold only their shard).

Each check lets trainer ranks publish versions, builds a replica of the adapter's sharded engine
(``build_sharded``: its ranks threads over one gloo group, or one process each when the adapter
says ``ranks_as_processes``), refits every rank through the engine's own loader
(``make_sharded_receiver``) and checks what nothing of the engine's word decides: every local
tensor equals the suite's own cut of the version's full weights
(:func:`~mx_sim.conformance.sharded_adapter.expected_shards`: torch's ``distribute_tensor`` for
DTensor parameters, the declared slices otherwise), went from A to B with A != B, kept its
storage address; each rank pulled exactly its shard bytes; warm cycles set nothing up; an
engine with a forward of its own gives the trainer's logits within the TP tolerance. Replica
TP 2 and 4 against trainers at TP 1, 2 and 4, KV heads repeated when TP exceeds them.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import asdict
from typing import Any

import torch

from mx_reference import adapter as caps
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.shards import Padding
from mx_sim.conformance.catalog import check, declared_families
from mx_sim.conformance.sharded_adapter import expected_shards
from mx_sim.fixtures import TinyModelSpec, VersionWeights, fixed_prompt
from mx_sim.refit.hf_tp_engine import TP_LOGITS_ATOL
from mx_sim.refit.ranks import check_cycle, copies, receiver_for
from mx_sim.refit.rig import RefitRig, RigConfig, replica_ranks
from mx_sim.sim_transport import make_transport

TIMEOUT_S = 5.0
KIND = "llama"


def _on_replica(
    adapter: Any, trainer_tp: int, tp: int, spec: TinyModelSpec, body, kind: str = KIND
) -> None:
    """``body(rank, group, registry, adapter, tp, spec, kind)`` on each rank of a ``tp``-rank
    replica, as the adapter's ranks run, while trainer TP ``trainer_tp`` publishes version 1
    of ``kind``, then version 2 once every rank has counted ``refitted/v1``
    (:func:`_refitted`)."""
    processes = adapter.ranks_as_processes
    config = RigConfig(kind, spec, trainer_tp=trainer_tp, timeout_s=TIMEOUT_S, tcp_store=processes)
    with RefitRig(config) as rig:
        rig.publish(1)
        stop = threading.Event()
        trainer = threading.Thread(target=_publish_when_refitted, args=(rig, tp, stop))
        trainer.start()
        try:
            replica_ranks(rig, tp, body, (adapter, tp, spec, kind), processes=processes)
        finally:
            stop.set()
            trainer.join()


def _refitted(registry: VersionRegistry, version: int) -> None:
    registry.store.add(f"refitted/v{version}", 1)


def _publish_when_refitted(rig: RefitRig, tp: int, stop: threading.Event) -> None:
    while int(rig.store.add("refitted/v1", 0)) < tp:
        if stop.wait(0.005):
            return  # the ranks ended without it: they failed, with their own message
    rig.publish(2)


def _sharded_receiver(adapter: Any, engine: Any, registry: VersionRegistry, agent, tp, rank, group):
    return receiver_for(
        engine.model,
        registry=registry,
        transport=agent,
        target=TargetLayout(tp_size=tp, tp_rank=rank),
        timeout_s=TIMEOUT_S,
        make=lambda model, **kw: adapter.make_sharded_receiver(engine, **kw),
        group=group,
    )


def _refit_rank(
    rank: int,
    group: Any,
    registry: VersionRegistry,
    adapter: Any,
    tp: int,
    spec: TinyModelSpec,
    kind: str,
) -> None:
    """One rank: versions 1 and 2 through the engine's loader, each checked."""
    engine = adapter.build_sharded(kind, tp_size=tp, tp_rank=rank, seed=1000, **asdict(spec))
    weights = VersionWeights(kind, spec)
    agent = make_transport("sim", f"sharded-{rank}-{uuid.uuid4().hex[:8]}", serves=False)
    receiver = _sharded_receiver(adapter, engine, registry, agent, tp, rank, group)
    try:
        addresses = {n: t.data_ptr() for n, t in engine.local.items()}
        previous = copies(engine.local)
        held = _sliced_bytes(engine)
        for v in (1, 2):
            who = f"v{v} TP rank {rank}/{tp}: "
            timing = receiver.refit(v)
            want = expected_shards(engine.model, engine.layout, weights.params(v))
            after = copies(engine.local)
            problems = check_cycle(v, previous, previous, after, want)
            if problems:
                more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
                raise AssertionError(who + "; ".join(problems[:3]) + more)
            moved = {n for n, t in engine.local.items() if t.data_ptr() != addresses[n]}
            if moved:
                raise AssertionError(f"{who}storage moved for {sorted(moved)[:3]}")
            if timing.bytes_pulled != held:
                raise AssertionError(
                    f"{who}pulled {timing.bytes_pulled} bytes for a shard of {held}: a "
                    "rank must pull exactly its own slices"
                )
            if v > 1 and (timing.registrations, timing.bytes_allocated) != (0, 0):
                raise AssertionError(
                    f"{who}warm cycle: {timing.registrations} registrations, "
                    f"{timing.bytes_allocated} bytes allocated"
                )
            if engine.forward is not None:
                _check_logits(who, engine, weights, v, spec)
            previous = after
            _refitted(registry, v)
    finally:
        receiver.close()
        agent.close()


def _sliced_bytes(engine: Any) -> int:
    """Bytes of the rank's local tensors that HF parameters fill: its padding rows excluded."""
    total = 0
    for name, parts in engine.layout.items():
        t = engine.local[name]
        rows = sum(p.stop - p.start for p in parts if not isinstance(p, Padding))
        total += t.numel() // t.shape[parts[0].dim] * rows * t.element_size()
    return total


def _check_logits(who: str, engine: Any, weights: VersionWeights, v: int, spec) -> None:
    """The engine's own TP forward against the full model of version ``v`` at TP 1."""
    prompt = fixed_prompt(spec.vocab_size)
    got = engine.forward(prompt).float()
    with torch.no_grad():
        want = weights.model(v)(prompt).logits.float()
    err = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    atol = TP_LOGITS_ATOL[spec.dtype]
    if not err <= atol:
        raise AssertionError(
            f"{who}the engine's logits differ from the trainer's (max abs {err:.3g}, shapes "
            f"{tuple(got.shape)} and {tuple(want.shape)}, allowed {atol:g})"
        )


def _replica_refit(
    adapter: Any, trainer_tp: int, tp: int, spec: TinyModelSpec, kind: str = KIND
) -> None:
    """Trainer TP ``trainer_tp`` -> a sharded replica of ``tp`` ranks, two cycles."""
    _on_replica(adapter, trainer_tp, tp, spec, _refit_rank, kind)


@check("refit.sharded_same_tp", requires=(caps.SHARDED,))
def sharded_same_tp(adapter) -> None:
    """Trainer TP2 -> a sharded TP2 replica: each rank writes exactly its own shard."""
    _replica_refit(adapter, 2, 2, TinyModelSpec())


@check("refit.sharded_wider", requires=(caps.SHARDED, caps.MIXED_TP))
def sharded_wider(adapter) -> None:
    """Trainer TP1 and TP2 -> a sharded TP4 replica (4 KV heads: one per rank)."""
    for trainer_tp in (1, 2):
        _replica_refit(adapter, trainer_tp, 4, TinyModelSpec(num_kv_heads=4))


@check("refit.sharded_narrower", requires=(caps.SHARDED, caps.MIXED_TP))
def sharded_narrower(adapter) -> None:
    """Trainer TP4 -> a sharded TP2 replica: row-parallel columns from two sources each."""
    _replica_refit(adapter, 4, 2, TinyModelSpec(num_kv_heads=4))


@check("refit.sharded_repeated_kv", requires=(caps.SHARDED, caps.MIXED_TP))
def sharded_repeated_kv(adapter) -> None:
    """More ranks than KV heads (TP4 over 2 heads, TP2 over 1): rank r holds head
    ``r // (T / G)``, as vLLM repeats it."""
    _replica_refit(adapter, 2, 4, TinyModelSpec(num_kv_heads=2))
    _replica_refit(adapter, 1, 2, TinyModelSpec(num_kv_heads=1))


@check("refit.sharded_vocab_and_tie", requires=(caps.SHARDED, caps.TIED_EMBEDDINGS))
def sharded_vocab_and_tie(adapter) -> None:
    """A vocab of 300 as the engine splits it (``torch.chunk``: 150 rows a rank; vLLM pads it
    to 320: 160 a rank, the last 20 padding; Megatron pads it to 512), with untied and with
    tied embeddings: every rank's vocab rows and lm_head are the new version's, its padding
    rows untouched."""
    _replica_refit(adapter, 2, 2, TinyModelSpec(vocab_size=300))
    _replica_refit(adapter, 2, 2, TinyModelSpec(vocab_size=300, tie_word_embeddings=True))


@check("refit.sharded_families", requires=(caps.SHARDED, caps.MIXED_TP))
def sharded_families(adapter) -> None:
    """Every family the adapter declares (``families``), trainer TP2 -> a sharded TP2 replica:
    each rank's shards and (with a forward) logits are the new version's."""
    for kind in declared_families(adapter):
        try:
            _replica_refit(adapter, 2, 2, TinyModelSpec(), kind)
        except AssertionError as exc:
            raise AssertionError(f"{kind}: {exc}") from exc


@check("refit.sharded_bad_layout", requires=(caps.SHARDED,))
def sharded_bad_layout(adapter) -> None:
    """A layout no plan covers fails at construction with a ValueError naming the tensor: a
    row-parallel weight declared split on the other dim, a mesh cutting a head, a declared
    slice that disagrees with the local shape."""
    processes = adapter.ranks_as_processes
    config = RigConfig(KIND, trainer_tp=1, timeout_s=TIMEOUT_S, tcp_store=processes)
    with RefitRig(config) as rig:
        args = (adapter, 2, TinyModelSpec(), KIND)
        replica_ranks(rig, 2, _bad_layout_rank, args, processes=processes)


def _bad_layout_rank(
    rank: int,
    group: Any,
    registry: VersionRegistry,
    adapter: Any,
    tp: int,
    spec: TinyModelSpec,
    kind: str,
) -> None:
    from mx_reference.refit.shards import SlicePart

    o_proj = "model.layers.0.self_attn.o_proj.weight"
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    bad = {  # at hidden 64, 4 heads of 16, TP 2
        "dim": (o_proj, (SlicePart(o_proj, 0, 0, 32),), (32, 64)),
        "placement": (qkv, (SlicePart(q_proj, 0, 0, 24),), (24, 64)),
        "shape": (o_proj, (SlicePart(o_proj, 1, 0, 32),), (64, 16)),
    }
    engine = adapter.build_sharded(kind, tp_size=tp, tp_rank=rank, **asdict(spec))
    layout, local = engine.layout, engine.local
    agent = make_transport("sim", f"sharded-{rank}-{uuid.uuid4().hex[:8]}", serves=False)
    try:
        for field, (name, parts, shape) in bad.items():
            engine.layout = {**layout, name: parts}
            engine.local = {**local, name: torch.zeros(shape, dtype=local[o_proj].dtype)}
            try:
                _sharded_receiver(adapter, engine, registry, agent, tp, rank, group)
            except ValueError as exc:
                if name not in str(exc) or f"field '{field}'" not in str(exc):
                    raise AssertionError(f"{field}: the error does not name it: {exc}") from exc
            else:
                raise AssertionError(f"a layout with a bad {field!r} was accepted")
    finally:
        agent.close()
