"""Descriptors: byte ranges on one agent (``MemDesc``) or a peer (``RemoteDesc``), and coalescing.

A remote descriptor is (agent, address, length, device id) inside a region the peer registered
and published; a local view is a contiguous tensor or a ``MemDesc`` inside a locally
registered region. Nothing here knows about requests, refit or a transport implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemDesc:
    """A byte range ``[addr, addr + length)`` in one agent's memory on device ``device_id``."""

    addr: int
    length: int
    device_id: int = 0

    @property
    def end(self) -> int:
        return self.addr + self.length

    def contains(self, other: MemDesc) -> bool:
        return (
            self.device_id == other.device_id and self.addr <= other.addr and other.end <= self.end
        )

    def slice(self, offset: int, length: int) -> MemDesc:
        """The sub-range ``[offset, offset + length)`` of this range."""
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(
                f"slice [{offset}, {offset + length}) is outside a range of {self.length} bytes"
            )
        return MemDesc(self.addr + offset, length, self.device_id)

    def on(self, agent: str) -> RemoteDesc:
        """This range as seen by a peer of ``agent``."""
        return RemoteDesc(agent, self.addr, self.length, self.device_id)


@dataclass(frozen=True)
class RemoteDesc:
    """A byte range inside memory that ``agent`` registered and published in its metadata."""

    agent: str
    addr: int
    length: int
    device_id: int = 0

    @property
    def end(self) -> int:
        return self.addr + self.length

    @property
    def mem(self) -> MemDesc:
        return MemDesc(self.addr, self.length, self.device_id)


LocalView = torch.Tensor | MemDesc
ReadPair = tuple[LocalView, RemoteDesc]


def desc_of(t: torch.Tensor, name: str = "tensor") -> MemDesc:
    """The bytes of contiguous tensor ``t`` (``name`` is used in the error message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or MemDesc, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: a transfer view must be contiguous (stride {t.stride()})")
    return MemDesc(t.data_ptr(), t.numel() * t.element_size(), max(t.get_device(), 0))


def coalesce(pairs: Sequence[tuple[MemDesc, RemoteDesc]]) -> list[tuple[MemDesc, RemoteDesc]]:
    """Merge reads that are adjacent on both sides into one descriptor pair.

    Pairs are ordered by (agent, device, remote address); a pair whose remote range starts where
    the previous one ended, and whose local range does the same, extends it. The bytes that land
    in local memory are the same as without coalescing as long as local ranges do not overlap
    (which :meth:`Transport.make_read` enforces).
    """
    order = sorted(
        pairs, key=lambda p: (p[1].agent, p[1].device_id, p[1].addr, p[0].device_id, p[0].addr)
    )
    merged: list[tuple[MemDesc, RemoteDesc]] = []
    for local, remote in order:
        if merged:
            prev_local, prev_remote = merged[-1]
            if (
                prev_remote.agent == remote.agent
                and prev_remote.device_id == remote.device_id
                and prev_remote.end == remote.addr
                and prev_local.device_id == local.device_id
                and prev_local.end == local.addr
            ):
                merged[-1] = (
                    MemDesc(prev_local.addr, prev_local.length + local.length, local.device_id),
                    RemoteDesc(
                        remote.agent,
                        prev_remote.addr,
                        prev_remote.length + remote.length,
                        remote.device_id,
                    ),
                )
                continue
        merged.append((local, remote))
    return merged


def overlaps(a: MemDesc, b: MemDesc) -> bool:
    """True when the two ranges share a byte (same device)."""
    return a.device_id == b.device_id and a.addr < b.end and b.addr < a.end
