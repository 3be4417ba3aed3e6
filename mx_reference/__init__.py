"""mx_reference: the readable reference implementation of mx-harness.

Four capabilities, one package each: discovery (which tensors a model publishes), ipc
(zero-copy tensors between processes), refit (trainer -> inference weight updates) and graphs
(CUDA-graph input validation). Accelerators are reached only through
:class:`mx_reference.backends.AcceleratorBackend`, so the same code runs on CUDA, other torch
devices, and the simulator's CPU mock.
"""

__version__ = "0.1.0"
