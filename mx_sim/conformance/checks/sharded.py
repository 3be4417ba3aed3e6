"""Conformance checks: refit.sharded_* (engines whose ranks hold only their shard).

Each check builds a replica of the adapter's sharded engine (``build_sharded``, one rank per
thread over a gloo group), lets trainer ranks publish versions, refits every rank through the
engine's own loader (``make_sharded_receiver``) and checks what nothing of the engine's word
decides: every local tensor equals the suite's own cut of the version's full weights by the
engine's declared layout (:func:`~mx_sim.conformance.sharded_adapter.cut`), went from A to B
with A != B, kept its storage address; each rank pulled exactly its shard bytes; warm cycles
set nothing up. Replica TP 2 and 4 against trainers at TP 1, 2 and 4, KV heads repeated when
TP exceeds them. The engine's own TP forward is checked against the trainer's logits in the
simulator's matrix, where transformers' TP engine runs one process per rank.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from mx_reference import adapter as caps
from mx_reference.refit.planner import TargetLayout
from mx_sim.conformance.catalog import check
from mx_sim.conformance.sharded_adapter import cut
from mx_sim.fixtures import TinyModelSpec
from mx_sim.refit.ranks import check_cycle, copies
from mx_sim.refit.rig import RefitRig, Replica, RigConfig

TIMEOUT_S = 5.0


def _replica_refit(
    adapter: Any, trainer_tp: int, tp: int, spec: TinyModelSpec, versions: int = 2
) -> None:
    """Trainer TP ``trainer_tp`` -> a sharded replica of ``tp`` ranks, ``versions`` cycles."""
    config = RigConfig("llama", spec, trainer_tp=trainer_tp, timeout_s=TIMEOUT_S)
    with RefitRig(config) as rig, Replica(tp, TIMEOUT_S) as replica:
        engines = [
            adapter.build_sharded("llama", tp_size=tp, tp_rank=r, seed=1000, **asdict(spec))
            for r in range(tp)
        ]

        def receiver(r: int) -> Any:
            engine = engines[r]
            return rig.new_receiver(
                engine.model,
                make=lambda model, **kw: adapter.make_sharded_receiver(engine, **kw),
                target=TargetLayout(tp_size=tp, tp_rank=r),
                group=replica.groups[r] if tp > 1 else None,
            )

        receivers = replica.map(receiver)
        addresses = [{n: t.data_ptr() for n, t in e.local.items()} for e in engines]
        previous = [copies(e.local) for e in engines]
        for v in range(1, versions + 1):
            rig.publish(v)
            timings = replica.map(lambda r: receivers[r].refit(v))  # noqa: B023
            full = rig.weights.params(v)
            for r, (engine, timing) in enumerate(zip(engines, timings, strict=True)):
                who = f"v{v} TP rank {r}/{tp}: "
                want = {n: cut(full, parts) for n, parts in engine.layout.items()}
                after = copies(engine.local)
                problems = check_cycle(v, previous[r], previous[r], after, want)
                if problems:
                    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
                    raise AssertionError(who + "; ".join(problems[:3]) + more)
                moved = {n for n, t in engine.local.items() if t.data_ptr() != addresses[r][n]}
                if moved:
                    raise AssertionError(f"{who}storage moved for {sorted(moved)[:3]}")
                held = sum(t.numel() * t.element_size() for t in engine.local.values())
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
                previous[r] = after


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
    """A vocab of 200 split by ``torch.chunk`` (100 rows a rank; Megatron pads it to 256),
    with untied and with tied embeddings: every rank's vocab rows and lm_head are the new
    version's."""
    _replica_refit(adapter, 2, 2, TinyModelSpec(vocab_size=200))
    _replica_refit(adapter, 2, 2, TinyModelSpec(vocab_size=200, tie_word_embeddings=True))


@check("refit.sharded_bad_layout", requires=(caps.SHARDED,))
def sharded_bad_layout(adapter) -> None:
    """A layout no plan covers fails at construction with a ValueError naming the tensor: a
    row-parallel weight declared split on the other dim, a mesh cutting a head, a declared
    slice that disagrees with the local shape."""
    from mx_reference.refit.shards import SlicePart

    spec = TinyModelSpec()
    with RefitRig(RigConfig("llama", spec, timeout_s=TIMEOUT_S)) as rig:
        o_proj = "model.layers.0.self_attn.o_proj.weight"
        qkv = "model.layers.0.self_attn.qkv_proj.weight"
        q_proj = "model.layers.0.self_attn.q_proj.weight"
        bad = {
            "dim": (o_proj, (SlicePart(o_proj, 0, 0, 32),), (32, 64)),
            "placement": (qkv, (SlicePart(q_proj, 0, 0, 24),), (24, 64)),
            "shape": (o_proj, (SlicePart(o_proj, 1, 0, 32),), (64, 16)),
        }
        for field, (name, parts, shape) in bad.items():
            engine = adapter.build_sharded("llama", tp_size=2, tp_rank=0, **asdict(spec))
            engine.layout = {**engine.layout, name: parts}
            engine.local = {**engine.local, name: torch.zeros(shape)}
            try:
                rig.new_receiver(
                    engine.model,
                    make=lambda model, **kw: adapter.make_sharded_receiver(engine, **kw),  # noqa: B023
                    target=TargetLayout(tp_size=2, tp_rank=0),
                )
            except ValueError as exc:
                if name not in str(exc) or f"field '{field}'" not in str(exc):
                    raise AssertionError(f"{field}: the error does not name it: {exc}") from exc
            else:
                raise AssertionError(f"a layout with a bad {field!r} was accepted")
