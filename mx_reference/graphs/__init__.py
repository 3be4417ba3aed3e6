"""Graph input validation: address ledgers, liveness, a capture runner and a CPU graph.

See ``docs/graphs.md``. The ledger answers "does every tensor a captured graph reads still live
where the graph reads it?"; the runner captures, stages static inputs and validates replays on
CUDA (``torch.cuda.CUDAGraph``) or on any other device with :class:`SimulatedGraph`.
"""

from mx_reference.graphs.capture import GraphRunner, RunnerConfig
from mx_reference.graphs.ledger import (
    InputAddressError,
    Ledger,
    LedgerDiff,
    TensorAddress,
    check_ledger,
    diff_ledgers,
    extract_tensor_addresses,
    input_tensors,
    ledger_of,
    module_address_ledger,
    module_tensors,
)
from mx_reference.graphs.liveness import DeadInput, DeadInputError, LivenessTracker
from mx_reference.graphs.simulated import GraphCaptureError, SimulatedGraph, SimulatedMemoryError

__all__ = [
    "DeadInput",
    "DeadInputError",
    "GraphCaptureError",
    "GraphRunner",
    "InputAddressError",
    "Ledger",
    "LedgerDiff",
    "LivenessTracker",
    "RunnerConfig",
    "SimulatedGraph",
    "SimulatedMemoryError",
    "TensorAddress",
    "check_ledger",
    "diff_ledgers",
    "extract_tensor_addresses",
    "input_tensors",
    "module_tensors",
    "ledger_of",
    "module_address_ledger",
]
