"""``mx-sim``: the simulator's command line (argparse only; :mod:`mx_sim.commands` runs them).

- ``mx-sim run``: the main job. Runs the default scenario matrix (discovery, multi-producer IPC,
  the refit matrix, graph capture across a refit) on CPU and writes ``report.json``,
  ``report.md`` and PNG plots; exits non-zero on any failure.
- ``mx-sim bench``: the benchmarks; JSON results and plots (``tox -e bench`` writes docs/perf).
- ``mx-sim conformance --adapter pkg.module:factory``: the conformance suite, run by pytest with
  the ``mx_conformance`` plugin, under the options of this command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mx_sim.bench import BENCH_MODULES
from mx_sim.commands import SCENARIO_MODULES
from mx_sim.conformance.run_checks import TRACEBACK_STYLES
from mx_sim.fixtures import MODEL_BUILDERS
from mx_sim.refit.faults import FAULTS
from mx_sim.refit.multiprocess import ENGINES, TRAINERS
from mx_sim.sim_transport import TRANSPORTS


class OneLineParser(argparse.ArgumentParser):
    """Bad options get one line on stderr (and exit code 2), never usage dumps or tracebacks."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(known: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown name(s) {', '.join(unknown) or '<empty>'}; choose from {', '.join(known)}"
            )
        return names

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fault(text: str) -> str:
    kind = text.split(":")[0]
    if kind not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {kind!r}; choose from {', '.join(FAULTS)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mx-sim", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    run = sub.add_parser(
        "run",
        help="run the default scenario matrix (the main job)",
        epilog="Any topology option (--model, --trainer-*, --inference-*, --replicas) replaces the "
        "refit matrix with one custom topology; unset sizes default to 1.",
    )
    run.add_argument(
        "--scenarios",
        type=_csv(SCENARIO_MODULES),
        default=list(SCENARIO_MODULES),
        help=f"comma-separated subset of {','.join(SCENARIO_MODULES)} (default: all)",
    )
    run.add_argument("--out", type=Path, default=Path("mx-sim-out"), help="output directory")
    run.add_argument("--quick", action="store_true", help="a smaller matrix, for smoke tests")
    run.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="sim",
        help="refit data plane: the simulated transport (default) or real NIXL over UCX",
    )
    run.add_argument(
        "--model",
        default=None,
        choices=list(MODEL_BUILDERS),
        help="tiny HF model family for a custom refit topology",
    )
    for side, dims in (("trainer", ("tp", "pp", "ep")), ("inference", ("tp", "pp"))):
        for dim in dims:
            run.add_argument(
                f"--{side}-{dim}", type=_positive, default=None, help=f"{side} {dim.upper()} size"
            )
    run.add_argument("--replicas", type=_positive, default=None, help="receiver replicas")
    for flag, default in (
        ("num-heads", 4),
        ("num-kv-heads", 2),
        ("vocab-size", 128),
        ("num-layers", 2),
    ):
        run.add_argument(
            f"--{flag}", type=_positive, default=None, help=f"tiny model {flag} (default {default})"
        )
    run.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="tiny model parameter dtype (default float32; bfloat16 runs the HF-split trainer)",
    )
    run.add_argument("--cycles", type=_positive, default=3, help="refit cycles per scenario")
    run.add_argument(
        "--trainer",
        choices=TRAINERS,
        default=None,
        help="who publishes refit versions: real Megatron-Core ranks, or HF weights cut into "
        "Megatron layout (default: megatron where it runs the row, else hf-split; hf-split for "
        "--fault)",
    )
    run.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="the inference replica: sharded HF TP ranks (each holds only its shard) or full "
        "models (default: hf-tp where the replica is tensor-parallel, else full; full for "
        "--fault)",
    )
    run.add_argument(
        "--fault",
        type=_fault,
        default=None,
        metavar="KIND[:CYCLE[:RANK]]",
        help=f"run one refit fault instead of the matrix ({', '.join(FAULTS)}); on the custom "
        "topology if one is given, else TP2->TP2; default cycle 2, trainer rank 0 or the last "
        "receiver rank",
    )

    bench = sub.add_parser("bench", help="run the benchmarks, write JSON and plots")
    bench.add_argument(
        "--out", type=Path, default=Path("docs/perf"), help="results directory (JSON, plots)"
    )
    bench.add_argument(
        "--only",
        type=_csv(BENCH_MODULES),
        default=list(BENCH_MODULES),
        help=f"comma-separated subset of {','.join(BENCH_MODULES)} (default: all)",
    )
    bench.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    bench.add_argument(
        "--page", type=Path, default=None, help="also write a markdown page (docs/performance.md)"
    )

    conformance = sub.add_parser(
        "conformance",
        help="run the adapter conformance suite (pytest with the mx_conformance plugin)",
    )
    conformance.add_argument("--adapter", required=True, help="pkg.module:factory")
    conformance.add_argument("--report", type=Path, default=None, help="JSON report path")
    conformance.add_argument("--xfail", type=Path, default=None, help="expected-failures file")
    conformance.add_argument(
        "-k", dest="keyword", default=None, help="select checks: pytest's -k over check ids"
    )
    conformance.add_argument(
        "--tb", choices=TRACEBACK_STYLES, default=None, help="pytest's traceback style"
    )
    conformance.add_argument(
        "--junit", type=Path, default=None, help="also write JUnit XML (pytest's --junitxml)"
    )
    conformance.add_argument(
        "-n", dest="workers", default=None, help="checks in parallel: pytest-xdist's -n (N, auto)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from mx_sim import commands

    handlers = {
        "run": commands.run_main,
        "bench": commands.bench_main,
        "conformance": commands.conformance_main,
    }
    try:
        return handlers[args.command](args)
    except ValueError as exc:
        print(f"mx-sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
