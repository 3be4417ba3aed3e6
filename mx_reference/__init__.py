"""mx_reference: the readable reference implementation of mx-harness.

Four capabilities, one package each: discovery (which tensors a model publishes), ipc
(zero-copy tensors between processes), refit (trainer -> inference weight updates) and graphs
(CUDA-graph input validation). Accelerators are reached only through
:class:`mx_reference.backends.AcceleratorBackend`, so the same code runs on CUDA, other torch
devices, and the simulator's CPU mock.

The package logs through :mod:`logging` (loggers under ``mx_reference``) and is quiet unless
the application configures logging: a library prints nothing on its own.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
