"""Benchmarks (not tests), run by ``tox -e bench`` / ``mx-sim bench``.

Each module here exposes ``run(out_dir: pathlib.Path, quick: bool) -> list[BenchResult]``; it may
also write PNG plots into ``out_dir``, and expose ``page_section(out_dir, page) -> str``: markdown
that ``--page`` appends to the page, rendered from the JSON the module wrote. Ratios are always
taken within one run.
"""

BENCH_MODULES = ("discovery", "ipc", "planner", "graphs", "transport", "refit", "peers")
