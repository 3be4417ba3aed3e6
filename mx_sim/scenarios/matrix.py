"""``mx-sim run``: the default scenario matrix and its report."""

from __future__ import annotations

import argparse
import time

from mx_sim.report import ScenarioResult
from mx_sim.runner import load_module, run_scenarios, scenario_table, write_run_report
from mx_sim.scenarios.refit import CUSTOM_KEYS, validate_options


def _run_scenario(name: str, args: argparse.Namespace) -> list[ScenarioResult]:
    start = time.perf_counter()
    module = load_module("mx_sim.scenarios", name)
    if name == "refit":
        rows = module.run(args.out, args.quick, options=refit_options(args))
    else:
        rows = module.run(args.out, args.quick)
    for row in rows:
        row.seconds = row.seconds or (time.perf_counter() - start) / len(rows)
    return rows


def refit_options(args: argparse.Namespace) -> dict:
    """The refit knobs the user set; the refit scenario fills in its defaults for the rest."""
    keys = ("transport", "cycles", *CUSTOM_KEYS)
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def run_main(args: argparse.Namespace) -> int:
    if "refit" in args.scenarios:
        validate_options(refit_options(args))
    print(f"[mx-sim] scenarios: {', '.join(args.scenarios)} -> {args.out}")
    results = run_scenarios(args.scenarios, args.out, lambda name: _run_scenario(name, args))
    write_run_report(results, args.out, {k: str(v) for k, v in vars(args).items()})
    print()
    print(scenario_table(results))
    failed = [r.name for r in results if not r.passed]
    print(
        f"\n[mx-sim] {len(results) - len(failed)}/{len(results)} passed; report in {args.out}/report.md"
    )
    return 1 if failed else 0
