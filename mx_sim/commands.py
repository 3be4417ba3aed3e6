"""The ``mx-sim`` command handlers: ``run`` (the scenario matrix and its report), ``bench`` and
``conformance``. :mod:`mx_sim.cli` parses the options and calls one of these."""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mx_sim.bench import BENCH_MODULES
from mx_sim.report import (
    BenchResult,
    ScenarioResult,
    bench_table,
    check_writable,
    scenario_table,
    write_performance_page,
    write_run_report,
)

SCENARIO_MODULES = ("discovery", "ipc", "refit", "graphs")


def run_scenarios(
    names: Sequence[str],
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
            row.seconds = row.seconds or elapsed / len(rows)
            log(f"[mx-sim]   {'PASS' if row.passed else 'FAIL'} {row.name}  {row.detail}")
        log(f"[mx-sim] {name} done in {elapsed:.1f} s")
        results.extend(rows)
    return results


def refit_options(args: argparse.Namespace) -> dict:
    """The refit knobs the user set; the refit scenario fills in its defaults for the rest."""
    from mx_sim.scenarios.refit import OPTION_KEYS

    return {k: getattr(args, k) for k in OPTION_KEYS if getattr(args, k, None) is not None}


def run_main(args: argparse.Namespace) -> int:
    """``mx-sim run``: every selected scenario, then report.json, report.md and plots."""
    from mx_sim.scenarios import refit

    options = refit_options(args)
    if "refit" in args.scenarios:
        refit.validate_options(options)
    check_writable(args.out / "report.json", "--out")  # found now, not after the whole run

    def run_one(name: str) -> list[ScenarioResult]:
        if name == "refit":
            return refit.run(args.out, args.quick, options=options)
        return importlib.import_module(f"mx_sim.scenarios.{name}").run(args.out, args.quick)

    print(f"[mx-sim] scenarios: {', '.join(args.scenarios)} -> {args.out}")
    results = run_scenarios(args.scenarios, run_one)
    write_run_report(results, args.out, {k: str(v) for k, v in vars(args).items()})
    print()
    print(scenario_table(results))
    failed = [r.name for r in results if not r.passed]
    print(
        f"\n[mx-sim] {len(results) - len(failed)}/{len(results)} passed; report in {args.out}/report.md"
    )
    return 1 if failed else 0


def run_benchmarks(
    names: Sequence[str], out_dir: Path, quick: bool, log: Callable[[str], None] = print
) -> list[BenchResult]:
    """Run ``names``; results.json and results.md keep the rows of benchmarks not run now."""
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in names if n not in BENCH_MODULES]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCH_MODULES)}")
    fresh: list[tuple[str, BenchResult]] = []
    for name in names:
        log(f"[mx-sim bench] {name} ...")
        rows = importlib.import_module(f"mx_sim.bench.{name}").run(out_dir, quick)
        for row in rows:
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in row.metrics.items())
            log(f"[mx-sim bench]   {'met ' if row.met else 'MISS'} {row.name}: {metrics}")
        fresh += [(name, row) for row in rows]
    tagged = _earlier_results(out_dir / "results.json", names, {r.name for _, r in fresh}) + fresh
    tagged.sort(key=lambda t: BENCH_MODULES.index(t[0]) if t[0] in BENCH_MODULES else -1)
    (out_dir / "results.json").write_text(
        json.dumps([{"module": m, **r.to_json()} for m, r in tagged], indent=2, default=str)
    )
    results = [r for _, r in tagged]
    (out_dir / "results.md").write_text(bench_table(results))
    return results


def _earlier_results(
    path: Path, rerun: Sequence[str], names: set[str]
) -> list[tuple[str, BenchResult]]:
    """The rows of an earlier results.json whose module is not run now, as ``(module, row)``;
    a row from before rows named their module is kept unless a new row has its name."""
    if not path.exists():
        return []
    out = []
    for row in json.loads(path.read_text()):
        module = row.pop("module", "")
        if module not in rerun and row["name"] not in names:
            out.append((module, BenchResult(**row)))
    return out


def bench_main(args: argparse.Namespace) -> int:
    """``mx-sim bench``: the benchmarks, their JSON and plots, and optionally the docs page."""
    results = run_benchmarks(args.only, args.out, args.quick)
    if args.page:
        modules = [importlib.import_module(f"mx_sim.bench.{name}") for name in BENCH_MODULES]
        sections = [
            m.page_section(args.out, args.page) for m in modules if hasattr(m, "page_section")
        ]
        write_performance_page(results, args.out, args.page, [s for s in sections if s])
    missed = [r.name for r in results if not r.met]
    print(f"[mx-sim bench] {len(results) - len(missed)}/{len(results)} goals met")
    return 0


def conformance_main(args: argparse.Namespace) -> int:
    """``mx-sim conformance``: the suite against ``--adapter``, run by ``pytest.main``."""
    from mx_sim.conformance.run_checks import run_conformance

    return run_conformance(
        args.adapter,
        report=args.report,
        xfails=args.xfail,
        keyword=args.keyword,
        tb=args.tb,
        junit=args.junit,
        workers=args.workers,
    )
