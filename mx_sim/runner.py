"""Drive scenario and benchmark modules, then write ``report.json``, ``report.md`` and plots."""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mx_sim.bench import BENCH_MODULES
from mx_sim.report import BenchResult, ScenarioResult

SCENARIO_MODULES = ("discovery", "ipc", "refit", "graphs")


def _plot_bars(path: Path, title: str, labels: list[str], values: list[float], unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.35 * len(labels) + 1)))
    ax.barh(labels, values, color="#4c72b0")
    ax.set_xlabel(unit)
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_scenarios(
    names: Sequence[str],
    out_dir: Path,
    run_one: Callable[[str], list[ScenarioResult]],
    log: Callable[[str], None] = print,
) -> list[ScenarioResult]:
    """Run each scenario module through ``run_one``; a module that raises becomes a failed row."""
    results: list[ScenarioResult] = []
    for name in names:
        log(f"[mx-sim] {name} ...")
        start = time.perf_counter()
        try:
            rows = run_one(name)
        except Exception as exc:  # a crashing scenario is a failure to report, not a traceback
            rows = [ScenarioResult(name=name, passed=False, detail=f"{type(exc).__name__}: {exc}")]
        elapsed = time.perf_counter() - start
        for row in rows:
            log(f"[mx-sim]   {'PASS' if row.passed else 'FAIL'} {row.name}  {row.detail}")
        log(f"[mx-sim] {name} done in {elapsed:.1f} s")
        results.extend(rows)
    return results


def scenario_table(results: Sequence[ScenarioResult]) -> str:
    """A markdown table: one row per scenario with bytes moved and refit phase timings."""
    phases = ("alloc", "register", "pull", "translate", "apply", "total")
    lines = [
        "| scenario | result | bytes moved | seconds | " + " | ".join(phases) + " | detail |",
        "|---|---|---:|---:|" + "---:|" * len(phases) + "---|",
    ]
    for r in results:
        timing = " | ".join(f"{r.timings[p]:.4f}" if p in r.timings else "" for p in phases)
        lines.append(
            f"| {r.name} | {'PASS' if r.passed else 'FAIL'} | {r.bytes_moved:,} | "
            f"{r.seconds:.2f} | {timing} | {r.detail} |"
        )
    return "\n".join(lines)


def write_run_report(results: Sequence[ScenarioResult], out_dir: Path, config: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    passed = sum(r.passed for r in results)
    report = {
        "config": config,
        "passed": passed,
        "failed": len(results) - passed,
        "scenarios": [r.to_json() for r in results],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    md = [
        "# mx-sim run",
        "",
        f"{passed}/{len(results)} scenarios passed.",
        "",
        scenario_table(results),
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(md))
    _plot_bars(
        out_dir / "scenario_seconds.png",
        "mx-sim run: seconds per scenario",
        [r.name for r in results],
        [r.seconds for r in results],
        "seconds",
    )


def load_module(package: str, name: str):
    return importlib.import_module(f"{package}.{name}")


def run_benchmarks(
    names: Sequence[str], out_dir: Path, quick: bool, log: Callable[[str], None] = print
) -> list[BenchResult]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[BenchResult] = []
    for name in names:
        if name not in BENCH_MODULES:
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCH_MODULES)}")
        log(f"[mx-sim bench] {name} ...")
        rows = load_module("mx_sim.bench", name).run(out_dir, quick)
        for row in rows:
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in row.metrics.items())
            log(f"[mx-sim bench]   {'met ' if row.met else 'MISS'} {row.name}: {metrics}")
        results.extend(rows)
    (out_dir / "results.json").write_text(
        json.dumps([r.to_json() for r in results], indent=2, default=str)
    )
    (out_dir / "results.md").write_text(bench_table(results))
    return results


def bench_table(results: Sequence[BenchResult]) -> str:
    lines = ["| benchmark | goal met | metrics | goals |", "|---|---|---|---|"]
    for r in results:
        metrics = "<br>".join(f"{k} = {v:.4g}" for k, v in r.metrics.items())
        goals = "<br>".join(f"{k}: {v}" for k, v in r.goals.items())
        lines.append(f"| {r.name} | {'yes' if r.met else 'NO'} | {metrics} | {goals} |")
    return "\n".join(lines) + "\n"
