"""``mx-sim run`` refit scenarios: the CI topology matrix, 3 cycles each, in real processes.

Each row passes when every receiver went from version A to version B in every tensor (A != B)
in each cycle, its logits matched the trainer's model bit for bit, and warm cycles registered
and allocated nothing. ``timings`` holds the last (warm) cycle of the slowest receiver rank;
``details`` every receiver rank's per-cycle records.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from mx_reference.refit.planner import IncompleteRefitPlan
from mx_sim.models import TinyModelSpec
from mx_sim.refit_sim import RefitRunResult, plan_topology, run_topology
from mx_sim.report import REFIT_PHASES, ScenarioResult
from mx_sim.topology import TopologySpec

PHASES = (*REFIT_PHASES, "total")

# name -> (topology, model kind, model spec, replica fan-out)
MATRIX: dict[str, tuple[TopologySpec, str, TinyModelSpec | None, bool]] = {
    "refit TP1->TP1": (TopologySpec(), "llama", None, False),
    "refit TP2->TP1": (TopologySpec(trainer_tp=2), "llama", None, False),
    "refit TP1->TP2": (TopologySpec(inference_tp=2), "qwen2", None, False),
    "refit TP2->TP4 GQA": (TopologySpec(trainer_tp=2, inference_tp=4), "llama", None, False),
    "refit PP2xTP2->TP4": (
        TopologySpec(trainer_tp=2, trainer_pp=2, inference_tp=4),
        "llama",
        None,
        False,
    ),
    "refit EP2->EP1 MoE": (TopologySpec(trainer_ep=2), "mixtral", None, False),
    # GPT-2 ties lm_head to wte; vocab 200 pads to 256 at TP2, so both trainer ranks hold real
    # embedding rows and the receiver merges the tied tensor from two shards
    "refit tied embeddings": (
        TopologySpec(trainer_tp=2),
        "gpt2",
        TinyModelSpec(vocab_size=200),
        False,
    ),
    "refit fan-out 1->1->2": (TopologySpec(replicas=3), "llama", None, True),
}
QUICK = ("refit TP2->TP1", "refit TP2->TP4 GQA", "refit EP2->EP1 MoE")


def to_scenario(name: str, result: RefitRunResult, cycles: int = 3) -> ScenarioResult:
    receivers = result.receiver_cycles()
    warm_ok = all(
        c["registrations"] == 0 and c["bytes_allocated"] == 0 for cs in receivers for c in cs[1:]
    )
    last = max((cs[-1] for cs in receivers if cs), key=lambda c: c["total"], default={})
    passed = result.passed and warm_ok and all(len(cs) == cycles for cs in receivers)
    detail = (
        "bit-exact logits, warm cycles 0 registrations"
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
        details={"receivers": receivers, "label": result.label},
    )


CUSTOM_KEYS = ("model", *(f.name for f in fields(TopologySpec)))


def validate_options(options: dict) -> None:
    """Reject a custom topology that cannot be refit (TP not dividing the KV heads...) with a
    one-line ``ValueError``, by planning it in threads before any process is spawned."""
    custom = {k: v for k, v in options.items() if k in CUSTOM_KEYS}
    if not custom:
        return
    kind = custom.pop("model", "llama")
    spec = TopologySpec(**custom)
    try:
        plan_topology(spec, kind)
    except IncompleteRefitPlan as exc:
        first = str(exc).removeprefix("refit plan incomplete: ").split("; ")[0]
        raise ValueError(f"topology {spec.label()} cannot refit {kind}: {first}") from exc


def run(out_dir: Path, quick: bool, options: dict | None = None) -> list[ScenarioResult]:
    """The matrix (``quick``: a subset), or one custom topology when ``options`` set any of
    ``CUSTOM_KEYS``; ``transport`` ("sim" or "nixl") and ``cycles`` apply to every row."""
    options = dict(options or {})
    transport, cycles = options.pop("transport", "sim"), options.pop("cycles", 3)
    matrix = MATRIX
    if any(k in options for k in CUSTOM_KEYS):
        kind = options.pop("model", "llama")
        spec = TopologySpec(**options)
        matrix = {f"refit {spec.label()} {kind}": (spec, kind, None, False)}
    elif quick:
        matrix = {k: v for k, v in MATRIX.items() if k in QUICK}
    rows = []
    for name, (spec, kind, model_spec, fanout) in matrix.items():
        result = run_topology(
            spec,
            kind,
            cycles=cycles,
            transport=transport,
            out_dir=out_dir,
            model_spec=model_spec,
            fanout=fanout,
        )
        rows.append(to_scenario(name, result, cycles))
    return rows
