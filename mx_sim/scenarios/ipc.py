"""N producers x M consumers over the shared tensor channel: every tensor arrives bit-exact, at the
right consumer, exactly once."""

from __future__ import annotations

import pathlib
from collections import Counter

from mx_reference.ipc import SharedChannelConfig
from mx_sim.ipc_workers import Plan, make_tensors, run_processes
from mx_sim.report import ScenarioResult
from mx_sim.scenarios import ipc_faults


def run_fan_in(
    num_producers: int = 3,
    num_consumers: int = 2,
    plan: Plan | None = None,
    timeout_s: float = 60.0,
) -> ScenarioResult:
    """Spawn the producers and consumers, collect what each consumer saw, and check it."""
    plan = (
        Plan(messages=40, seed=0, disabled_producers=(num_producers - 1,)) if plan is None else plan
    )
    config = SharedChannelConfig(get_timeout_s=20.0, ttl_s=30.0)
    try:
        reports, seconds = run_processes(num_producers, num_consumers, plan, config, timeout_s)
    except TimeoutError as exc:
        return ScenarioResult("ipc_fan_in", False, str(exc))
    return _check(reports, num_producers, num_consumers, plan, seconds)


def _check(
    reports, num_producers: int, num_consumers: int, plan: Plan, seconds: float
) -> ScenarioResult:
    deliveries: Counter[tuple[int, int]] = Counter()
    problems: list[str] = []
    tensors = bytes_moved = 0
    for c in range(num_consumers):
        for producer, seq, target, n, nbytes, ok in reports[("consumer", c)]["seen"]:
            deliveries[(producer, seq)] += 1
            tensors += n
            bytes_moved += nbytes
            if target != c:
                problems.append(f"p{producer}/{seq} for consumer {target} arrived at {c}")
            if not ok:
                problems.append(f"p{producer}/{seq} arrived corrupted at consumer {c}")
    expected = {(p, s) for p in range(num_producers) for s in range(plan.messages)}
    problems += [
        f"p{p}/{s} delivered {deliveries[(p, s)]} times"
        for p, s in sorted(expected)
        if deliveries[(p, s)] != 1
    ]
    fallbacks: Counter[str] = Counter()
    for p in range(num_producers):
        fallbacks.update(reports[("producer", p)]["fallbacks"])
    leftovers = sum(reports[("consumer", c)]["buffered"] for c in range(num_consumers))
    pending = sum(reports[("producer", p)]["pending"] for p in range(num_producers))
    if leftovers or pending:
        problems.append(f"{leftovers} tensors left buffered, {pending} never acked")
    expected_tensors = sum(len(make_tensors(p, s)) for p, s in expected)
    return ScenarioResult(
        name="ipc_fan_in",
        passed=not problems and tensors == expected_tensors,
        detail="; ".join(problems[:5])
        or f"{num_producers}x{num_consumers}: {tensors} tensors exactly once, {sum(fallbacks.values())} inline fallbacks",
        bytes_moved=bytes_moved,
        seconds=seconds,
        details={
            "tensors_delivered": tensors,
            "tensors_expected": expected_tensors,
            "messages": len(expected),
            "fallbacks": dict(fallbacks),
        },
    )


def run(out_dir: pathlib.Path, quick: bool) -> list[ScenarioResult]:
    plan = Plan(messages=20 if quick else 80, seed=0, disabled_producers=(2,))
    return [run_fan_in(3, 2, plan), *ipc_faults.run(quick)]
