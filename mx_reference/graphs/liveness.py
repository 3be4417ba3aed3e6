"""Input liveness: is the memory a captured graph reads still owned by its input?

Follows PyTorch's ``check_input_liveness`` model. Each input is tracked by a weak reference to
its untyped storage and the storage's data pointer at capture. It is alive iff the storage is
alive and still at that pointer, so an input that was freed, re-pointed with ``set_()`` or grown
with ``resize_()`` is dead. A view is alive while its base's storage lives. Empty tensors are not
tracked, and neither is memory owned by the graph's own pool (outputs of earlier captures).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

MAX_DEAD_LISTED = 5


@dataclass(frozen=True)
class DeadInput:
    path: str
    storage_ptr: int
    reason: str  # "freed" or "moved to 0x..."

    def __str__(self) -> str:
        return f"{self.path} (storage {self.storage_ptr:#x} {self.reason})"


class DeadInputError(RuntimeError):
    """Replay would read memory its inputs no longer own. ``.dead`` lists them all."""

    def __init__(self, key: object, dead: list[DeadInput]):
        lines = [f"Graph {key!r} replay detected {len(dead)} dead tensor(s):"]
        lines += [f"  {d}" for d in dead[:MAX_DEAD_LISTED]]
        if len(dead) > MAX_DEAD_LISTED:
            lines.append(f"  ... and {len(dead) - MAX_DEAD_LISTED} more")
        super().__init__("\n".join(lines))
        self.key = key
        self.dead = dead


class LivenessTracker:
    """Weak references to the storages of a graph's inputs, taken at capture.

    ``pool_owns(storage_ptr)`` says whether a pointer belongs to the graph's memory pool; such
    inputs are ignored, as PyTorch ignores dead inputs inside the graph's own pool.
    """

    def __init__(
        self,
        inputs: Iterable[tuple[str, torch.Tensor]],
        pool_owns: Callable[[int], bool] = lambda ptr: False,
    ):
        self._tracked: list[tuple[str, weakref.ref, int]] = []
        for path, t in inputs:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr != 0 and not pool_owns(ptr):
                self._tracked.append((path, weakref.ref(storage), ptr))

    @property
    def paths(self) -> list[str]:
        return [path for path, _, _ in self._tracked]

    def dead(self) -> list[DeadInput]:
        found = []
        for path, ref, ptr in self._tracked:
            storage = ref()
            if storage is None:
                found.append(DeadInput(path, ptr, "freed"))
            elif storage.data_ptr() != ptr:
                found.append(DeadInput(path, ptr, f"moved to {storage.data_ptr():#x}"))
        return found

    def check(self, key: object) -> None:
        """Raise :class:`DeadInputError` if any tracked input is dead."""
        dead = self.dead()
        if dead:
            raise DeadInputError(key, dead)
