"""Scenarios behind ``mx-sim run``.

Each module here exposes ``run(out_dir: pathlib.Path, quick: bool) -> list[ScenarioResult]``.
"""
