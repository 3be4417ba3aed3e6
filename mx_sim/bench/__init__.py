"""Benchmarks (not tests), run by ``tox -e bench`` / ``mx-sim bench``.

Each module here exposes ``run(out_dir: pathlib.Path, quick: bool) -> list[BenchResult]``; it may
also write PNG plots into ``out_dir``. Ratios are always taken within one run.
"""

BENCH_MODULES = ("discovery", "ipc", "planner", "graphs", "transport", "refit")
