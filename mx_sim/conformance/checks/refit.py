"""Conformance checks: refit.*

Each check builds the adapter's model (``build_model``) and receiver (``make_receiver`` with
:class:`~mx_reference.refit.receiver.RefitReceiver`'s keyword arguments), lets the simulator's
trainer ranks publish weight versions (:class:`~mx_sim.refit.rig.RefitRig`), and compares what
the receiver applied with the trainer's model at that version
(:class:`~mx_sim.refit.ranks.ReceiverRank`). The receiver contract the checks use:
``refit(version)`` returns the cycle's timing (``registrations``, ``bytes_allocated``,
``bytes_pulled``), and ``close()``.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import asdict
from typing import Any

import torch

from mx_reference import adapter as caps
from mx_reference.graphs.ledger import Ledger, diff_ledgers, module_address_ledger
from mx_reference.refit.apply import model_digest, model_parameters
from mx_reference.refit.layouts import megatron_shards_from_hf
from mx_reference.refit.planner import TargetLayout, assemble, plan_refit
from mx_reference.refit.wire import ALIGNMENT, make_manifest
from mx_sim.conformance.catalog import check, declared_families
from mx_sim.fixtures import TinyModelSpec, VersionWeights, pp_stage
from mx_sim.refit.faults import Fault
from mx_sim.refit.ranks import MODEL_ID, ReceiverRank, check_cycle, snapshot
from mx_sim.refit.rig import RefitRig, Replica, RigConfig

TIMEOUT_S = 5.0  # every wait: registry, transfer, gloo collective
LLAMA = TinyModelSpec()  # GQA: 4 query heads in 2 groups
UNEVEN = TinyModelSpec(intermediate_size=98)  # fc1 / fc2 rows 24, 24, 24, 26 at TP 4
TIED = TinyModelSpec(tie_word_embeddings=True)


def _rig(kind: str, spec: TinyModelSpec, **config: Any) -> RefitRig:
    return RefitRig(RigConfig(kind, spec, **{"timeout_s": TIMEOUT_S, **config}))


def build(adapter: Any, kind: str, spec: TinyModelSpec) -> torch.nn.Module:
    """The adapter's model of ``kind``, from weights no trainer version has (seed 1000)."""
    return adapter.build_model(kind, seed=1000, **asdict(spec))


def _rank(rig: RefitRig, adapter: Any, model: torch.nn.Module, **kw: Any) -> ReceiverRank:
    """The adapter's receiver for ``model`` as a checked receiver rank."""
    receiver = rig.new_receiver(model, make=adapter.make_receiver, **kw)
    return ReceiverRank(receiver, model, rig.weights)


def _raise(problems: list[str], who: str = "") -> None:
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AssertionError(who + "; ".join(problems[:3]) + more)


def _cycles(rig: RefitRig, rank: ReceiverRank, versions: range) -> list[Any]:
    """Publish and refit each version; check every tensor and the logits; return the timings."""
    timings = []
    for v in versions:
        rig.publish(v)
        timing, problems = rank.cycle(v)
        _raise(problems)
        timings.append(timing)
    return timings


@check("refit.same_layout_bit_exact")
def same_layout_bit_exact(adapter) -> None:
    """Trainer TP1 -> receiver TP1 over 3 cycles: every tensor goes A -> B, logits match."""
    with _rig("llama", LLAMA) as rig:
        _cycles(rig, _rank(rig, adapter, build(adapter, "llama", LLAMA)), range(1, 4))


@check("refit.families", requires=(caps.MIXED_TP,))
def families(adapter) -> None:
    """Every family the adapter declares (``families``), trainer TP2 -> receiver TP1, two
    cycles: every tensor A -> B bit-exact, logits equal."""
    for kind in declared_families(adapter):
        with _rig(kind, LLAMA, trainer_tp=2) as rig:
            try:
                _cycles(rig, _rank(rig, adapter, build(adapter, kind, LLAMA)), range(1, 3))
            except AssertionError as exc:
                raise AssertionError(f"{kind}: {exc}") from exc


@check("refit.bf16_padded_vocab", requires=(caps.MIXED_TP,))
def bf16_padded_vocab(adapter) -> None:
    """A bf16 model whose vocab (300) is no multiple of Megatron's padding: trainer TP2 pads
    it to 512 rows (256 a rank), and the receiver keeps exactly the 300 real rows, bit-exact
    over two cycles."""
    spec = TinyModelSpec(vocab_size=300, dtype="bfloat16")
    with _rig("llama", spec, trainer_tp=2) as rig:
        try:
            _cycles(rig, _rank(rig, adapter, build(adapter, "llama", spec)), range(1, 3))
        except Exception as exc:
            raise AssertionError(f"bf16, vocab 300 from trainer TP 2: {exc}") from exc


@check("refit.warm_cycle_scratch", requires=(caps.MIXED_TP,))
def warm_cycle_scratch(adapter) -> None:
    """Trainer TP2 -> TP1 (strided row-parallel scratch): warm cycles allocate and register
    nothing and still apply the new bytes."""
    with _rig("llama", LLAMA, trainer_tp=2) as rig:
        rank = _rank(rig, adapter, build(adapter, "llama", LLAMA))
        cold, *warm = _cycles(rig, rank, range(1, 4))
        plan = plan_refit(rig.registry.manifests(MODEL_ID, 3), TargetLayout())
        assert any(t.assembly == "scratch" for t in plan.tensors.values()), "no scratch piece"
        if cold.registrations < 1 or cold.bytes_allocated <= 0:
            raise AssertionError(
                f"cold cycle reports {cold.registrations} registrations and "
                f"{cold.bytes_allocated} bytes allocated; it must set up its buffers"
            )
        for v, t in enumerate(warm, start=2):
            if (t.registrations, t.bytes_allocated) != (0, 0):
                raise AssertionError(
                    f"v{v} (warm): {t.registrations} registrations, {t.bytes_allocated} bytes "
                    "allocated; an unchanged layout must reuse every buffer"
                )


def _slice_bytes(rig: RefitRig, target: TargetLayout) -> tuple[int, int]:
    """What one target rank needs: bytes of its destination slices plus the whole source
    shards its strided pieces are cut from, and how many buffers that is."""
    manifests = rig.registry.manifests(MODEL_ID, rig.registry.discover(MODEL_ID)[0])
    plan = plan_refit(manifests, target).require_complete()
    shards = {(m.rank, d.name): d.nbytes for m in manifests for d in m.tensors}
    scratch = {(p.src_rank, n) for n, t in plan.tensors.items() for p in t.pieces if not p.direct}
    nbytes = sum(t.nbytes for t in plan.tensors.values()) + sum(shards[k] for k in scratch)
    return nbytes, len(plan.tensors) + len(scratch)


@check("refit.mixed_tp_wider", requires=(caps.MIXED_TP,))
def mixed_tp_wider(adapter) -> None:
    """Trainer TP2 -> a TP4 replica (2 KV groups, uneven last rank): each rank's buffers fit
    its slices and every rank's model equals the trainer's."""
    size = 4
    with _rig("llama", UNEVEN, trainer_tp=2) as rig, Replica(size, TIMEOUT_S) as replica:
        ranks = [
            _rank(
                rig,
                adapter,
                build(adapter, "llama", UNEVEN),
                target=adapter.target_layout(
                    tp_size=size, tp_rank=r, pp_size=1, pp_rank=0, global_rank=r
                ),
                group=replica.groups[r],
            )
            for r in range(size)
        ]
        for v in (1, 2):
            rig.publish(v)
            # logits on the last rank only: the others' forwards add nothing but time
            results = replica.map(lambda r: ranks[r].cycle(v, logits=r == size - 1))  # noqa: B023
            for r, (timing, problems) in enumerate(results):
                _raise(problems, f"TP rank {r}: ")
                if v > 1:
                    continue
                need, buffers = _slice_bytes(rig, TargetLayout(tp_size=size, tp_rank=r))
                if timing.bytes_allocated > need + buffers * ALIGNMENT:
                    raise AssertionError(
                        f"TP rank {r}: allocated {timing.bytes_allocated} bytes for slices of "
                        f"{need} bytes: a buffer is sized beyond its rank's extent"
                    )


def _check_positions(
    adapter, kind: str, orders: dict[str, Any], *, tp: int, pp: int = 1, ep: int = 1
) -> None:
    """For each rank order (``(pp_rank, ep_rank, tp_rank) -> global rank``) and each position
    of an inference TP ``tp`` x PP ``pp`` x EP ``ep`` layout, the layout the adapter reports
    plans and assembles exactly what a Megatron rank at that TP and EP position holds of its
    PP stage (a trainer at TP1 EP1 publishes, experts grouped as with grouped GEMM)."""
    weights = VersionWeights(kind, LLAMA)
    state, cfg = weights.params(1), weights.model_config
    published = megatron_shards_from_hf(state, cfg, tp_size=1, tp_rank=0, expert_layout="grouped")
    manifests = [make_manifest(MODEL_ID, 1, [d for d, _ in published])]
    shards = {0: {d.name: t for d, t in published}}
    for order, global_rank in orders.items():
        for p, e, t in itertools.product(range(pp), range(ep), range(tp)):
            g = global_rank(p, e, t)
            # the EP keywords only where EP is checked: an engine without experts may omit them
            expert = {"ep_size": ep, "ep_rank": e} if ep > 1 else {}
            layout = adapter.target_layout(
                tp_size=tp, tp_rank=t, pp_size=pp, pp_rank=p, global_rank=g, **expert
            )
            got = assemble(plan_refit(manifests, layout).require_complete(), shards)
            want = megatron_shards_from_hf(
                state, cfg, tp_size=tp, tp_rank=t, ep_size=ep, ep_rank=e, expert_layout="grouped"
            )
            for d, shard in want:
                if pp_stage(d.name, cfg.num_layers, pp) != p:
                    continue
                if not torch.equal(got[d.name], shard):
                    raise AssertionError(
                        f"{order}: rank tp={t} pp={p} ep={e} (global {g}): {d.name}: the "
                        f"layout places another rank's slice (layout reports {layout})"
                    )


@check("refit.pp_target_layout", requires=(caps.PIPELINE_PARALLEL,))
def pp_target_layout(adapter) -> None:
    """Inference TP2 x PP2: the reported layout places each rank's own TP slice, whatever its
    global rank (TP-fastest after a controller rank, or PP-fastest)."""
    tp, pp = 2, 2
    orders = {
        "TP-fastest after one controller rank": lambda p, e, t: 1 + p * tp + t,
        "PP-fastest": lambda p, e, t: t * pp + p,
    }
    _check_positions(adapter, "llama", orders, tp=tp, pp=pp)


@check("refit.ep_target_layout", requires=(caps.MOE,))
def ep_target_layout(adapter) -> None:
    """Inference TP2 x EP2 over grouped experts: the reported layout places each rank's own
    experts and TP slice, whatever its global rank (TP-fastest after a controller rank, or
    EP-fastest)."""
    tp, ep = 2, 2
    orders = {
        "TP-fastest after one controller rank": lambda p, e, t: 1 + e * tp + t,
        "EP-fastest": lambda p, e, t: t * ep + e,
    }
    _check_positions(adapter, "mixtral", orders, tp=tp, ep=ep)


@check("refit.tied_embeddings", requires=(caps.TIED_EMBEDDINGS,))
def tied_embeddings(adapter) -> None:
    """Tied embedding: pulled once (bytes pulled == bytes published), lm_head equals the
    embedding and still shares its storage after every cycle."""
    with _rig("llama", TIED) as rig:
        model = build(adapter, "llama", TIED)
        rank = _rank(rig, adapter, model)
        for v in (1, 2):
            rig.publish(v)
            timing, problems = rank.cycle(v)
            embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
            if head.untyped_storage().data_ptr() != embed.untyped_storage().data_ptr():
                raise AssertionError(f"v{v}: lm_head no longer shares the embedding's storage")
            _raise(problems)
            published = rig.published_bytes(v)
            if timing.bytes_pulled != published:
                raise AssertionError(
                    f"v{v}: pulled {timing.bytes_pulled} bytes of {published} published: "
                    "each tensor must be pulled exactly once"
                )


@check("refit.moe_expert_parallel", requires=(caps.MOE,))
def moe_expert_parallel(adapter) -> None:
    """Mixtral trainer EP2 -> receiver EP1 over 2 cycles: every expert lands in place."""
    spec = TinyModelSpec()
    with _rig("mixtral", spec, trainer_ep=2) as rig:
        _cycles(rig, _rank(rig, adapter, build(adapter, "mixtral", spec)), range(1, 3))


def _check_ledger(adapter, model: torch.nn.Module, ledger: Ledger, what: str) -> None:
    diff = diff_ledgers(ledger, module_address_ledger(model, backend=adapter.backend))
    if diff:
        raise AssertionError(
            diff.format(f"{what} moved parameter storage: captured graphs read the old weights")
        )


@check("refit.in_place_storage")
def in_place_storage(adapter) -> None:
    """Refit copies into the parameters: the address ledger a captured graph relies on is
    unchanged after 2 cycles."""
    with _rig("llama", LLAMA) as rig:
        model = build(adapter, "llama", LLAMA)
        ledger = module_address_ledger(model, backend=adapter.backend)
        _cycles(rig, _rank(rig, adapter, model), range(1, 3))
        _check_ledger(adapter, model, ledger, "refit")


def _refused_then_recovered(adapter, fault: Fault, what: str) -> None:
    """Cycle 2 meets ``fault`` on trainer rank 1 of 2: the refit raises a message, the model
    digest is unchanged, and version 3 still applies bit-exactly."""
    with _rig("llama", LLAMA, trainer_pp=2, fault=fault) as rig:
        model = build(adapter, "llama", LLAMA)
        rank = _rank(rig, adapter, model)
        _cycles(rig, rank, range(1, 2))
        rig.publish(2)
        digest = model_digest(model)
        try:
            rank.receiver.refit(2)
        except Exception as exc:  # any error type, as long as it says something
            if not str(exc).strip():
                raise AssertionError(
                    f"failed cycle raised {type(exc).__name__} with no message"
                ) from exc
        else:
            raise AssertionError(f"v2: {what} but refit raised nothing")
        if model_digest(model) != digest:
            raise AssertionError(f"v2 failed ({what}) yet the model changed: a partial apply")
        rig.publish(3)
        before = snapshot(model)
        rank.receiver.refit(3)
        _raise(check_cycle(3, before, before, snapshot(model), rig.weights.params(3)))


def _replica_cycle(
    rig: RefitRig, replica: Replica, ranks: list[ReceiverRank], version: int, after: str = ""
) -> None:
    """Publish ``version`` and refit it on every rank; any failure is an AssertionError."""
    rig.publish(version)
    try:
        results = replica.map(lambda r: ranks[r].cycle(version, logits=False))
    except Exception as exc:
        raise AssertionError(f"v{version} {after}: {type(exc).__name__}: {exc}") from exc
    for r, (_, problems) in enumerate(results):
        _raise(problems, f"v{version} {after}, TP rank {r}: ")


@check("refit.replica_fault", requires=(caps.MIXED_TP,))
def replica_fault(adapter) -> None:
    """A TP2 replica (its ranks given one group) meets a failed read on one trainer rank in
    cycle 2: every rank raises, within the timeout, and no rank's model changes; cycle 3
    applies on both."""
    fault = Fault("read_failed", cycle=3, rank=1)  # its third served read: cycle 2's first
    size = 2
    with (
        _rig("llama", LLAMA, trainer_pp=2, fault=fault) as rig,
        Replica(size, TIMEOUT_S) as replica,
    ):
        models = [build(adapter, "llama", LLAMA) for _ in range(size)]
        ranks = [
            _rank(
                rig,
                adapter,
                models[r],
                target=adapter.target_layout(
                    tp_size=size, tp_rank=r, pp_size=1, pp_rank=0, global_rank=r
                ),
                group=replica.groups[r],
            )
            for r in range(size)
        ]
        _replica_cycle(rig, replica, ranks, 1)
        rig.publish(2)
        digests = [model_digest(m) for m in models]

        def failing_cycle(r: int) -> str:
            start = time.monotonic()
            try:
                ranks[r].receiver.refit(2)
            except Exception as exc:
                elapsed = time.monotonic() - start
                if elapsed > 2 * TIMEOUT_S:
                    return f"raised only after {elapsed:.1f} s"
                return "" if str(exc).strip() else f"raised {type(exc).__name__} with no message"
            return "applied v2 while a rank of its replica failed"

        outcomes = replica.map(failing_cycle)
        problems = [f"TP rank {r}: {o}" for r, o in enumerate(outcomes) if o]
        problems += [
            f"TP rank {r}: v2 failed on the replica yet this rank's model changed"
            for r, m in enumerate(models)
            if model_digest(m) != digests[r]
        ]
        _raise(problems, "v2 (a trainer read failed): ")
        _replica_cycle(rig, replica, ranks, 3, after="after v2 failed on the replica")


@check("refit.mid_transfer_failure")
def mid_transfer_failure(adapter) -> None:
    """One of two trainer ranks fails its read mid-pull: a clear error, the model digest
    unchanged, and the next version still applies."""
    _refused_then_recovered(
        adapter, Fault("read_failed", cycle=2, rank=1), "a source's read failed mid-pull"
    )


@check("refit.corruption_in_flight")
def corruption_in_flight(adapter) -> None:
    """A byte of one trainer rank's shard is flipped in flight (silently, as a bad link
    would): the version is refused, the model digest unchanged, the next version applies."""
    _refused_then_recovered(
        adapter, Fault("corrupt_shard", cycle=2, rank=1), "a pulled byte was corrupted"
    )


@check("refit.partial_version", requires=(caps.MIXED_TP,))
def partial_version(adapter) -> None:
    """A version only one of two trainer ranks has published yet is not applied (a refit of
    it fails within the timeout, the model unchanged: no mixed-version model); once the
    other rank publishes it, it applies bit-exactly."""
    wait_s = 1.0
    with _rig("llama", LLAMA, trainer_tp=2, timeout_s=wait_s) as rig:
        model = build(adapter, "llama", LLAMA)
        rank = _rank(rig, adapter, model)
        _cycles(rig, rank, range(1, 2))
        rig.trainers[0].publish(2)  # trainer rank 1 is still at version 1
        digest, start = model_digest(model), time.monotonic()
        try:
            rank.receiver.refit(2)
        except Exception:
            if time.monotonic() - start > 4 * wait_s + TIMEOUT_S:
                raise AssertionError(
                    f"v2 half published: refused only after {time.monotonic() - start:.1f} s"
                ) from None
        else:
            raise AssertionError("v2 applied while only trainer rank 0 of 2 had published it")
        if model_digest(model) != digest:
            raise AssertionError("v2 half published: refused, yet the model changed")
        rig.trainers[1].publish(2)
        before = snapshot(model)
        rank.receiver.refit(2)
        _raise(check_cycle(2, before, before, snapshot(model), rig.weights.params(2)))


@check("refit.trainer_layout_change", requires=(caps.MIXED_TP,))
def trainer_layout_change(adapter) -> None:
    """The trainer restarts at another TP (and back) between versions: each later version
    still applies bit-exactly, so no plan cached for the old sources' layout is reused."""
    with _rig("llama", LLAMA, trainer_tp=2) as rig:
        model = build(adapter, "llama", LLAMA)
        rank = _rank(rig, adapter, model)
        for versions, trainer_tp in ((range(1, 3), 1), (range(3, 5), 2), (range(5, 6), None)):
            try:
                _cycles(rig, rank, versions)
            except Exception as exc:
                raise AssertionError(
                    f"v{versions[0]} from trainer TP {rig.spec.trainer_tp} after a layout "
                    f"change: {type(exc).__name__}: {exc}"
                ) from exc
            if trainer_tp is not None:
                rig.restart_trainers(trainer_tp)


def _forward_in_thread(adapter: Any, model: torch.nn.Module, hold_s: float) -> tuple:
    """A forward admitted by the adapter's scheduler that reads the weights at its start and,
    ``hold_s`` later, at its end; returns (thread, entered event, [(start, end) digests])."""
    entered, reads = threading.Event(), []

    def forward() -> None:
        with adapter.inference():
            entered.set()
            first = model_digest(model)
            time.sleep(hold_s)
            reads.append((first, model_digest(model)))

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    return thread, entered, reads


@check("refit.pause_gating")
def pause_gating(adapter) -> None:
    """pause() returns only once running forwards finished and admits none until resume(),
    and ``paused`` says so: a refit between pause() and resume() never lands inside a
    forward, which reads one version from start to end."""
    with _rig("llama", LLAMA) as rig:
        model = build(adapter, "llama", LLAMA)
        rank = _rank(rig, adapter, model)
        rig.publish(1)
        running, entered, reads = _forward_in_thread(adapter, model, hold_s=0.3)
        if not entered.wait(TIMEOUT_S):
            raise AssertionError("a forward was not admitted by inference() while not paused")
        adapter.pause()
        if not reads:  # the forward appends its reads before it leaves inference()
            raise AssertionError(
                "pause() returned while a forward admitted before it was still running"
            )
        if not adapter.paused:
            raise AssertionError("paused is False after pause() returned")
        rank.receiver.refit(1)
        waiting, admitted, _ = _forward_in_thread(adapter, model, hold_s=0.0)
        if admitted.wait(0.2):
            raise AssertionError("inference() admitted a forward while paused")
        adapter.resume()
        for thread in (running, waiting):
            thread.join(TIMEOUT_S)
        if adapter.paused or not admitted.is_set():
            raise AssertionError("after resume(): paused still True or no forward admitted")
        if reads[0][0] != reads[0][1]:
            raise AssertionError("a refit landed inside a running forward")


@check("refit.load_weights_atomic")
def load_weights_atomic(adapter) -> None:
    """load_weights copies in place; a wrong shape or dtype (bf16 into fp32: no silent cast)
    or an unknown name raises ValueError naming the tensor, with the model untouched."""
    weights = VersionWeights("llama", LLAMA)
    model = build(adapter, "llama", LLAMA)
    ledger = module_address_ledger(model, backend=adapter.backend)
    previous = snapshot(model)
    v1 = weights.params(1)
    adapter.load_weights(model, v1.items())
    _raise(check_cycle(1, previous, previous, snapshot(model), v1))
    _check_ledger(adapter, model, ledger, "load_weights")
    digest = model_digest(model)
    v2 = list(weights.params(2).items())
    name, last = v2[-1]  # last: a loader that streams would have written the others
    unknown = "model.layers.7.mlp.up_proj.weight"
    bad = {
        "shape": [*v2[:-1], (name, last[..., :-1])],
        "dtype": [*v2[:-1], (name, last.to(torch.bfloat16))],
        "unknown name": [*v2, (unknown, v2[0][1])],
    }
    for what, items in bad.items():
        culprit = unknown if what == "unknown name" else name
        try:
            adapter.load_weights(model, items)
        except ValueError as exc:
            if culprit not in str(exc):
                raise AssertionError(
                    f"{what}: ValueError does not name {culprit!r}: {exc}"
                ) from exc
        else:
            raise AssertionError(f"{what}: load_weights accepted a bad tensor {culprit!r}")
        if model_digest(model) != digest:
            raise AssertionError(f"{what}: load_weights failed but changed the model")
    assert set(model_parameters(model)) == set(v1)
