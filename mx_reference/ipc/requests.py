"""Request-scoped bookkeeping for out-of-band tensors, kept apart from the codec.

The codec only sees tensors. The sender tags each tensor it ships with the request being encoded
(:func:`request_scope`), and the receiver keeps tensors that arrived before their message in a
:class:`TensorBuffer`, which frees them on :meth:`~TensorBuffer.abort`, after a TTL, or when a
newer message from the same producer is consumed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

TensorKey = tuple[str, int, int]
"""``(producer_id, message_id, tensor_index)``: where a shipped tensor came from."""


def normalize_request_ids(request_ids: str | Iterable[str]) -> frozenset[str]:
    """One id or a collection of ids, as a set.

    A ``str`` is one id, never a collection of one-character ids (vLLM's abort iterated over the
    characters of a lone id); ``bytes`` and non-string members are rejected.
    """
    if isinstance(request_ids, str):
        return frozenset((request_ids,))
    if isinstance(request_ids, bytes | bytearray | memoryview):
        raise TypeError(
            f"request_ids must be a str or a collection of str, got {type(request_ids).__name__}"
        )
    ids = frozenset(request_ids)
    for request_id in ids:
        if not isinstance(request_id, str):
            raise TypeError(
                f"request_ids: member {request_id!r} is a {type(request_id).__name__}, not a str"
            )
    return ids


class RequestScoped(Protocol):
    """A sender that tags what it ships with a request id and sends it to a target consumer."""

    request_id: str | None
    target: int

    def set_target(self, target: int) -> None: ...


@contextlib.contextmanager
def request_scope(
    sender: RequestScoped, request_id: str, target: int | None = None
) -> Iterator[None]:
    """Tag every tensor shipped inside the block with ``request_id`` (and route it to ``target``);
    the previous request and target are restored on exit, also on error."""
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
    previous = sender.request_id, sender.target
    if target is not None:
        sender.set_target(target)
    sender.request_id = request_id
    try:
        yield
    finally:
        sender.request_id, sender.target = previous


@dataclass
class Buffered:
    tensor: torch.Tensor
    request_id: str | None
    arrived: float


class TensorBuffer:
    """Tensors that arrived before the message that refers to them.

    Per producer it keeps a watermark: the newest message id consumed. Taking a tensor of a newer
    message discards the producer's older buffered tensors (their messages were consumed or
    dropped); tensors arriving for a message older than the watermark are dropped on arrival.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self.clock = clock
        self.entries: dict[TensorKey, Buffered] = {}
        self.watermark: dict[str, int] = {}
        self.stale = 0  # discarded because a newer message was consumed
        self.late = 0  # dropped on arrival, older than the watermark
        self.expired = 0  # reclaimed after the TTL
        self.aborted = 0  # freed by abort()

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key: TensorKey, tensor: torch.Tensor, request_id: str | None) -> bool:
        """Buffer ``tensor``; False (and dropped) when its message is already behind the watermark."""
        producer, message_id, _ = key
        if message_id < self.watermark.get(producer, -1):
            self.late += 1
            return False
        self.entries[key] = Buffered(tensor, request_id, self.clock())
        return True

    def advance(self, producer: str, message_id: int) -> None:
        """Mark ``message_id`` as the newest consumed from ``producer``, discarding older tensors."""
        current = self.watermark.get(producer, -1)
        if message_id < current:
            raise ValueError(
                f"producer {producer}: message {message_id} is older than message {current}, "
                "already consumed; its tensors were discarded as stale"
            )
        if message_id == current:
            return
        self.watermark[producer] = message_id
        stale = [k for k in self.entries if k[0] == producer and k[1] < message_id]
        for key in stale:
            del self.entries[key]
        if stale:
            self.stale += len(stale)
            log.warning(
                "discarding %d stale tensors from producer %s (messages older than %d)",
                len(stale),
                producer,
                message_id,
            )

    def take(self, key: TensorKey) -> Buffered | None:
        return self.entries.pop(key, None)

    def abort(self, request_ids: str | Iterable[str]) -> int:
        """Free every buffered tensor of these requests (one id or a collection); returns how many."""
        ids = normalize_request_ids(request_ids)
        doomed = [k for k, b in self.entries.items() if b.request_id in ids]
        for key in doomed:
            del self.entries[key]
        self.aborted += len(doomed)
        return len(doomed)

    def expire(self) -> int:
        """Reclaim tensors buffered longer than the TTL (a dead or silent producer); returns how many."""
        deadline = self.clock() - self.ttl_s
        doomed = [k for k, b in self.entries.items() if b.arrived < deadline]
        for key in doomed:
            del self.entries[key]
        if doomed:
            self.expired += len(doomed)
            log.warning(
                "reclaimed %d tensors buffered for more than %.1f s", len(doomed), self.ttl_s
            )
        return len(doomed)
