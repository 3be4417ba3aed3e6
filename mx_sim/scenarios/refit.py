"""``mx-sim run`` refit scenarios: the CI matrix (:mod:`mx_sim.refit.matrix`), 3 cycles each, in
real processes; or one custom topology; or one fault.

A row passes when every receiver went from version A to version B in every tensor (A != B)
in each cycle (a sharded rank: every local shard, against the suite's own cut of the version),
its logits matched the trainer's (bit for bit on one rank; within 1e-5 through a TP forward or
against Megatron-Core's), and warm cycles registered and allocated nothing. A fault row passes when the fault was contained: every rank ended with a
clear error (or was the one killed) and no receiver's model changed. ``timings`` holds the last
(warm) cycle of the slowest receiver rank; ``details`` every receiver rank's per-cycle records
and, for a fault, one line per rank.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from mx_reference.refit.planner import IncompleteRefitPlan
from mx_sim.cluster.topology import TopologySpec
from mx_sim.fixtures import TinyModelSpec
from mx_sim.refit.faults import FAULTS, Fault
from mx_sim.refit.matrix import FAULT_TOPOLOGY, MATRIX, QUICK, MatrixRow
from mx_sim.refit.megatron_trainer import megatron_available
from mx_sim.refit.multiprocess import (
    RefitRunResult,
    check_engine,
    check_trainer,
    default_trainer,
    run_topology,
)
from mx_sim.refit.planning import plan_topology
from mx_sim.report import REFIT_PHASES, ScenarioResult

PHASES = (*REFIT_PHASES, "total")
# the tiny model's sizes the CLI may set (TinyModelSpec fields)
SIZE_KEYS = ("num_heads", "num_kv_heads", "vocab_size", "num_layers", "dtype")
CUSTOM_KEYS = ("model", *(f.name for f in fields(TopologySpec)), *SIZE_KEYS)
OPTION_KEYS = ("transport", "cycles", "fault", "trainer", "engine", *CUSTOM_KEYS)


def to_scenario(name: str, result: RefitRunResult, cycles: int = 3) -> ScenarioResult:
    receivers = result.receiver_cycles()
    last = max((cs[-1] for cs in receivers if cs), key=lambda c: c["total"], default={})
    details = {"receivers": receivers, "label": result.label, "ranks": result.rank_lines()}
    if "[" in result.label:  # a fault run: contained or not
        detail = "contained: " if result.passed else "NOT contained: "
        detail += "; ".join(result.errors[:2]) or "no rank reported an error"
        return ScenarioResult(name, result.passed, detail, result.bytes_moved, result.seconds,
                              {p: last[p] for p in PHASES if p in last}, details)  # fmt: skip
    warm_ok = all(
        c["registrations"] == 0 and c["bytes_allocated"] == 0 for cs in receivers for c in cs[1:]
    )
    passed = result.passed and warm_ok and all(len(cs) == cycles for cs in receivers)
    if result.trainer == "megatron":
        logits = f"logits within 1e-05 of Megatron-Core's (max {result.logits_max_abs():.2g})"
    elif result.engine == "hf-tp":
        atol = max(r.get("logits_atol", 0.0) for r in result.ranks)
        logits = f"TP logits within {atol:g} (max {result.logits_max_abs():.2g})"
    else:
        logits = "bit-exact logits"
    if result.engine == "hf-tp":
        pulled = [cs[0]["bytes_pulled"] for cs in receivers if cs]
        ratio = result.pulled_over_model()
        logits = (
            f"sharded HF TP, pulled {'/'.join(map(str, pulled))} B per rank "
            f"({ratio:.3f}x the model); {logits}"
        )
    detail = (
        f"{logits}, warm cycles 0 registrations"
        if passed
        else "; ".join(result.errors[:3] or ["warm cycle registered or allocated"])
    )
    return ScenarioResult(
        name=name,
        passed=passed,
        detail=detail,
        bytes_moved=result.bytes_moved,
        seconds=result.seconds,
        timings={p: last[p] for p in PHASES if p in last},
        details=details,
    )


def _custom(options: dict) -> MatrixRow | None:
    custom = {k: options[k] for k in CUSTOM_KEYS if k in options}
    if not custom:
        return None
    kind = custom.pop("model", "llama")
    sizes = {k: custom.pop(k) for k in SIZE_KEYS if k in custom}
    return MatrixRow(TopologySpec(**custom), kind, TinyModelSpec(**sizes) if sizes else None)


def _fault(options: dict, row: MatrixRow | None) -> tuple[Fault, MatrixRow]:
    """The fault the user named, on their topology or the fault topology. Without a rank it
    strikes trainer rank 0, or the last receiver rank; without a cycle, cycle 2."""
    row = row or MatrixRow(FAULT_TOPOLOGY)
    kind, *rest = options["fault"].split(":")
    if kind in FAULTS and len(rest) < 2:
        rank = 0 if FAULTS[kind].side == "trainer" else row.spec.world_size - 1
        rest = [*(rest or ["2"]), str(rank)]
    return Fault.parse(":".join([kind, *rest])), row


def validate_options(options: dict) -> None:
    """Reject what cannot run with a one-line ``ValueError`` before any process is spawned: a
    bad fault, or a custom topology that cannot be refit (TP not dividing the KV heads...),
    found by planning it in threads."""
    row = _custom(options)
    if "fault" in options:
        fault, row = _fault(options, row)
        fault.check_rank(row.spec)
    if row is None:
        return
    if "trainer" in options:
        check_trainer(options["trainer"], row.spec, row.kind, row.model_spec or TinyModelSpec())
    if "engine" in options:
        check_engine(options["engine"], row.spec, row.kind, fanout=False)
    try:
        plan_topology(row.spec, row.kind, row.model_spec)
    except IncompleteRefitPlan as exc:
        first = str(exc).removeprefix("refit plan incomplete: ").split("; ")[0]
        raise ValueError(f"topology {row.spec.label()} cannot refit {row.kind}: {first}") from exc


def run(out_dir: Path, quick: bool, options: dict | None = None) -> list[ScenarioResult]:
    """The matrix (``quick``: a subset), one custom topology when ``options`` set any of
    ``CUSTOM_KEYS``, or one ``fault`` (``KIND[:cycle[:rank]]``) on it; ``transport`` ("sim" or
    "nixl") and ``cycles`` apply to every row."""
    options = dict(options or {})
    transport, cycles = options.get("transport", "sim"), options.get("cycles", 3)
    custom = _custom(options)
    if "fault" in options:  # on the HF-split trainer unless asked: faults test the data plane
        fault, row = _fault(options, custom)
        trainer = options.get("trainer", "hf-split")
        result = run_topology(
            row.spec, row.kind, cycles, transport, fault, out_dir, model_spec=row.model_spec,
            trainer=trainer, engine=options.get("engine", "full"), timeout_s=3.0, deadline_s=60,
        )  # fmt: skip
        return [to_scenario(f"refit {row.spec.label()} fault {fault.kind}", result, cycles)]
    if custom is not None:
        matrix = {f"refit {custom.spec.label()} {custom.kind}": custom}
    elif quick:
        matrix = {k: v for k, v in MATRIX.items() if k in QUICK}
    else:
        matrix = MATRIX
    if "trainer" not in options and not megatron_available():
        print("[mx-sim] megatron-core is not installed: refit rows use the HF-split trainer")
    rows = []
    for name, row in matrix.items():
        result = run_topology(
            row.spec,
            row.kind,
            cycles=cycles,
            transport=transport,
            out_dir=out_dir,
            model_spec=row.model_spec,
            fanout=row.fanout,
            trainer=options.get("trainer")
            or default_trainer(row.spec, row.kind, row.model_spec or TinyModelSpec()),
            engine=options.get("engine"),
        )
        rows.append(to_scenario(name, result, cycles))
    return rows
