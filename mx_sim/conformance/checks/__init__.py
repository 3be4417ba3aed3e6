"""Conformance checks, one module per feature; importing this package registers them all."""

from mx_sim.conformance.checks import discovery, graphs, ipc, refit, sharded  # noqa: F401
