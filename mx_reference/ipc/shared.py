"""Shared tensor channel: out-of-band tensors over ``torch.multiprocessing`` queues.

CPU tensors travel through shared memory and CUDA tensors through CUDA IPC; only a small handle
goes in the message. Topology: one data queue per consumer (engine), any number of producers (API
servers) writing to any of them, and one ack queue per producer. Each shipped tensor is tagged
``(producer_id, message_id, tensor_index)`` plus the request it belongs to; the receiver checks
dtype, shape and device on arrival, acks it, and the producer drops its reference on the ack
(or after a TTL when the consumer died).

A handle also names its producer's pid. A receiver waiting for a tensor watches that process
(a Linux pidfd) as well as its queue, so a producer's death ends the wait at once: it is noticed
once, and every later message that names a tensor the dead producer never delivered fails
straight away with :class:`ProducerGone`, however many were in flight. Other producers' tensors
keep flowing and are never reclaimed on its account.

Sharing strategy: ``file_descriptor`` (the Linux default), because its shared segments are
unlinked as soon as they are created, so a SIGKILLed producer or consumer leaves nothing in
``/dev/shm``. The cost is one fd per in-flight storage, held by the producer (in
``multiprocessing``'s resource sharer) until the consumer fetches it, or until the TTL gives up on
a consumer that never will: then the producer withdraws the fd, so a dead consumer costs a
bounded number of fds. ``file_system`` would keep named ``/dev/shm/torch_*`` segments that
outlive a crash.

The queues pickle (``torch.multiprocessing`` reductions): they connect processes this program
spawned, never untrusted peers. The codec's decoder itself never unpickles.
"""

from __future__ import annotations

import io
import logging
import multiprocessing.connection
import multiprocessing.queues
import os
import queue
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing import resource_sharer
from multiprocessing.reduction import ForkingPickler
from typing import Any, Literal, NamedTuple

import torch
import torch.multiprocessing as tmp

from mx_reference.ipc.codec import DecodeError
from mx_reference.ipc.requests import TensorBuffer, TensorKey

log = logging.getLogger(__name__)

SHAREABLE_DEVICES = ("cpu", "cuda")


class ReceiverStarved(TimeoutError):
    """The handle named a tensor that did not arrive in time: the producer is dead, slow, or
    lost it. (A producer that fell back to inline sends frames, so its receiver never waits.)"""


class ProducerGone(ReceiverStarved):
    """The handle named a tensor of a producer whose process has exited: it will never arrive."""


@dataclass(frozen=True)
class SharedChannelConfig:
    """``enabled=False`` ships every tensor inline (counted as a ``disabled`` fallback).

    ``put_timeout_s``: how long a full data queue may block the producer before it falls back to
    inline. ``get_timeout_s``: how long a receiver waits for a tensor its message names.
    ``ttl_s``: how long a receiver buffers an unclaimed tensor, and a producer keeps an unacked
    one; past it the producer also withdraws the fd it offers for it, so a consumer that fetches
    it later loses it (counted in ``lost``). Keep it well above ``get_timeout_s``. ``resend``:
    what to do with a tensor this process received and now sends on (``clone`` it, or
    ``reject`` it with ``ValueError``).
    """

    enabled: bool = True
    put_timeout_s: float = 0.5
    get_timeout_s: float = 10.0
    ttl_s: float = 60.0
    resend: Literal["clone", "reject"] = "clone"
    sharing_strategy: Literal["file_descriptor", "file_system"] = "file_descriptor"


def setup_sharing(config: SharedChannelConfig) -> None:
    """Apply ``config.sharing_strategy`` to this process (call it in every producer and consumer)."""
    tmp.set_sharing_strategy(config.sharing_strategy)


class TensorItem(NamedTuple):
    """What travels on a data queue."""

    producer_id: str
    slot: int  # the producer's ack queue
    message_id: int
    tensor_index: int
    request_id: str | None
    tensor: torch.Tensor


@dataclass
class TensorQueues:
    """One data queue per consumer and one ack queue per producer; picklable to spawned children."""

    data: list[Any]
    acks: list[Any]
    start_method: str

    @classmethod
    def create(
        cls, num_producers: int, num_consumers: int, ctx=None, maxsize: int = 0
    ) -> TensorQueues:
        """Queues from a ``torch.multiprocessing`` context (``spawn`` unless given)."""
        if num_producers < 1 or num_consumers < 1:
            raise ValueError(
                f"need >= 1 producer and consumer, got {num_producers} and {num_consumers}"
            )
        ctx = tmp.get_context("spawn") if ctx is None else ctx
        data = [ctx.Queue(maxsize) for _ in range(num_consumers)]
        return cls(data, [ctx.Queue() for _ in range(num_producers)], ctx.get_start_method())

    @classmethod
    def local(cls, num_producers: int, num_consumers: int, maxsize: int = 0) -> TensorQueues:
        """In-process ``queue.Queue`` instances: the same protocol without sharing, for one process."""
        return cls(
            [queue.Queue(maxsize) for _ in range(num_consumers)],
            [queue.Queue() for _ in range(num_producers)],
            "local",
        )

    def close(self) -> None:
        """Close this process's ends. Unflushed puts are abandoned rather than waited for: a dead
        peer must not block this process's exit."""
        for q in (*self.data, *self.acks):
            if isinstance(q, multiprocessing.queues.Queue):
                q.close()
                q.cancel_join_thread()


class _FdNotingPickler(ForkingPickler):
    """Torch's pickler (``torch.multiprocessing`` reductions), noting the key under which this
    process's fd server (``multiprocessing.resource_sharer``) offers each storage it pickles."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file)
        self.fd_keys: list[int] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, resource_sharer.DupFd):
            self.fd_keys.append(obj._id[1])  # type: ignore[attr-defined]  # (address, key)
        return NotImplemented  # pickle it as usual


def _pickle_item(item: TensorItem) -> tuple[bytes, list[int]]:
    """``item`` as the bytes a process queue would send, and the fd-server keys of its storages.

    Pickled here rather than in the queue's feeder thread, so the producer knows which fds it
    offers for this tensor and can withdraw them when no consumer ever fetches them."""
    buffer = io.BytesIO()
    pickler = _FdNotingPickler(buffer)
    pickler.dump(item)
    return buffer.getvalue(), pickler.fd_keys


def _withdraw_fds(keys: Iterable[int]) -> None:
    """Close the fds this process still offers under ``keys``: their consumer never fetched them.

    ``multiprocessing`` has no public call for this; its resource sharer keeps each offered fd
    in ``_cache`` until a consumer connects for it, and a consumer that comes after all gets a
    closed connection, which it counts as lost."""
    sharer = resource_sharer._resource_sharer  # type: ignore[attr-defined]
    for key in keys:
        with sharer._lock:
            entry = sharer._cache.pop(key, None)
        if entry is not None:
            entry[1]()  # the DupFd's close()


@dataclass
class _InFlight:
    tensor: torch.Tensor  # kept alive until acked or past the TTL
    sent: float
    fd_keys: list[int]


# Storages this process received, so a tensor sent on is cloned first (torch's documented rule;
# a CUDA IPC handle cannot be re-exported). Keyed by data pointer, a weak ref says it is alive.
_received: dict[int, weakref.ref[torch.Tensor]] = {}


def _mark_received(t: torch.Tensor) -> None:
    ptr = t.untyped_storage().data_ptr()

    def forget(_: weakref.ref[torch.Tensor]) -> None:
        _received.pop(ptr, None)

    _received[ptr] = weakref.ref(t, forget)


def was_received(t: torch.Tensor) -> bool:
    """True when ``t`` (or a view of it) came in through a :class:`SharedTensorReceiver` here."""
    ref = _received.get(t.untyped_storage().data_ptr())
    return ref is not None and ref() is not None


class SharedTensorSender:
    """Producer side: a :class:`~mx_reference.ipc.codec.TensorSink` for the encoder.

    ``export`` puts the tensor on the target consumer's queue and returns a handle; it returns
    ``None`` (the encoder then sends a frame) when the channel is disabled, the start method is
    ``fork``, the device cannot be shared, or the queue stays full; ``fallbacks`` counts each reason.
    CPU tensors are moved into shared memory in place (``share_memory_``), so a write after sending
    is visible to the consumer.
    """

    def __init__(
        self,
        queues: TensorQueues,
        slot: int,
        config: SharedChannelConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        config = SharedChannelConfig() if config is None else config
        if not 0 <= slot < len(queues.acks):
            raise ValueError(f"slot {slot} out of range: {len(queues.acks)} producers")
        self.queues, self.slot, self.config, self.clock = queues, slot, config, clock
        self.producer_id = f"p{slot}-{uuid.uuid4().hex[:8]}"  # unique per incarnation
        self.request_id: str | None = None
        self.target = 0
        self.message_id = -1
        self._index = 0
        self.sent = 0
        self.resend_clones = 0
        self.expired = 0
        self.fallbacks: Counter[str] = Counter()
        self._in_flight: dict[tuple[int, int], _InFlight] = {}

    def set_target(self, target: int) -> None:
        """Route the following tensors to consumer ``target``."""
        if not 0 <= target < len(self.queues.data):
            raise ValueError(f"target {target} out of range: {len(self.queues.data)} consumers")
        self.target = target

    @property
    def pending(self) -> int:
        """Tensors sent but not yet acked by their consumer (kept alive here until then)."""
        return len(self._in_flight)

    def new_message(self) -> None:
        self.message_id += 1
        self._index = 0
        self.reap()

    def _unavailable(self, tensor: torch.Tensor) -> str | None:
        if not self.config.enabled:
            return "disabled"
        if self.queues.start_method == "fork":
            return "fork"
        if tensor.device.type not in SHAREABLE_DEVICES:
            return "device"
        return None

    def _fallback(self, reason: str) -> None:
        if not self.fallbacks[reason]:
            log.warning(
                "producer %s: shared channel unavailable (%s), sending inline",
                self.producer_id,
                reason,
            )
        self.fallbacks[reason] += 1

    def export(self, tensor: torch.Tensor) -> dict[str, Any] | None:
        reason = self._unavailable(tensor)
        if reason is not None:
            self._fallback(reason)
            return None
        if was_received(tensor):
            if self.config.resend == "reject":
                raise ValueError(
                    f"tensor {self._index} of message {self.message_id} was received from another "
                    "process; clone it before sending it on"
                )
            tensor = tensor.clone()
            self.resend_clones += 1
        if tensor.device.type == "cpu":
            tensor.share_memory_()
        item = TensorItem(
            self.producer_id, self.slot, self.message_id, self._index, self.request_id, tensor
        )
        data = self.queues.data[self.target]
        payload, fd_keys = (
            _pickle_item(item) if isinstance(data, multiprocessing.queues.Queue) else (item, [])
        )
        try:
            data.put(payload, timeout=self.config.put_timeout_s)
        except queue.Full:
            _withdraw_fds(fd_keys)
            self._fallback("queue_full")
            return None
        self._in_flight[(self.message_id, self._index)] = _InFlight(tensor, self.clock(), fd_keys)
        self._index += 1
        self.sent += 1
        return {
            "producer": self.producer_id,
            "pid": os.getpid(),
            "slot": self.slot,
            "message": item.message_id,
            "index": item.tensor_index,
            "device": str(tensor.device),
        }

    def reap(self) -> int:
        """Drop references the consumers acked, and those unacked past the TTL (withdrawing the
        fds offered for them); returns how many."""
        before = len(self._in_flight)
        acks = self.queues.acks[self.slot]
        while True:
            try:
                _, message_id, index = acks.get_nowait()
            except queue.Empty:
                break
            self._in_flight.pop((message_id, index), None)
        deadline = self.clock() - self.config.ttl_s
        expired = [k for k, entry in self._in_flight.items() if entry.sent < deadline]
        for key in expired:
            _withdraw_fds(self._in_flight.pop(key).fd_keys)
        if expired:
            # once at warning level: a dead consumer would otherwise log on every message
            level = logging.DEBUG if self.expired else logging.WARNING
            self.expired += len(expired)
            log.log(
                level,
                "producer %s: %d tensors never acked, released (and %d before)",
                self.producer_id,
                len(expired),
                self.expired - len(expired),
            )
        return before - len(self._in_flight)


def _handle_field(handle: dict[str, Any], name: str, kind: type) -> Any:
    value = handle.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DecodeError(f"shared handle: field {name!r} must be a {kind.__name__}, got {value!r}")
    return value


class SharedTensorReceiver:
    """Consumer side: a :class:`~mx_reference.ipc.codec.TensorSource` for the decoder.

    Tensors that arrive before their message (another producer's, or a later one) wait in
    :attr:`buffer`; :meth:`abort`, :meth:`poll` (TTL) and newer messages free them. Producers
    whose process exited are in :attr:`gone`; :meth:`close` releases the pidfds that watch the
    others.
    """

    def __init__(
        self,
        queues: TensorQueues,
        consumer: int,
        config: SharedChannelConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        config = SharedChannelConfig() if config is None else config
        if not 0 <= consumer < len(queues.data):
            raise ValueError(f"consumer {consumer} out of range: {len(queues.data)} consumers")
        self.queues, self.consumer, self.config, self.clock = queues, consumer, config, clock
        self.buffer = TensorBuffer(config.ttl_s, clock)
        self.received = 0
        self.lost = 0  # items that could not be rebuilt (their producer died before the fetch)
        self.gone: set[str] = set()  # producers whose process exited
        self._pidfds: dict[str, int] = {}  # producer -> a pidfd of its process, while it lives

    def abort(self, request_ids: str | Iterable[str]) -> int:
        """Free every buffered tensor of these requests; one id or a collection of ids."""
        return self.buffer.abort(request_ids)

    def poll(self) -> int:
        """Buffer whatever has arrived without waiting, then reclaim tensors past the TTL."""
        while self._receive(timeout=0.0):
            pass
        return self.buffer.expire()

    def close(self) -> None:
        """Release the pidfds watching producers."""
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()

    def _watch(self, producer: str, pid: int) -> None:
        """Watch ``producer``'s process, once. Only across processes, and only where Linux pidfds
        exist; elsewhere a dead producer's tensors fail after ``get_timeout_s`` each."""
        data = self.queues.data[self.consumer]
        if (
            producer in self._pidfds
            or producer in self.gone
            or pid == os.getpid()
            or not isinstance(data, multiprocessing.queues.Queue)
            or not hasattr(os, "pidfd_open")
        ):
            return
        for other, fd in list(self._pidfds.items()):  # bury exited producers: bounded pidfds
            if multiprocessing.connection.wait([fd], 0):
                self._bury(other)
        try:
            self._pidfds[producer] = os.pidfd_open(pid)
        except ProcessLookupError:
            self._bury(producer)

    def _bury(self, producer: str) -> None:
        """``producer``'s process exited: note it once, and buffer what its queue still holds."""
        fd = self._pidfds.pop(producer, None)
        if fd is not None:
            os.close(fd)
        self.gone.add(producer)
        lost = self.lost
        while self._receive(0.0):
            pass
        log.warning(
            "consumer %d: producer %s exited; its undelivered tensors are lost (%d in the queue)",
            self.consumer,
            producer,
            self.lost - lost,
        )

    def _receive(self, timeout: float, watch: str | None = None) -> bool:
        """Move one item from the queue into the buffer. False when none came within ``timeout``;
        True as soon as one did, or as soon as the watched producer's process exited (then it is
        in :attr:`gone`)."""
        q = self.queues.data[self.consumer]
        pidfd = self._pidfds.get(watch) if watch is not None else None
        if watch is not None and pidfd is not None and timeout > 0:
            # one blocking wait on the queue's pipe and on the producer's exit, whichever is first
            ready = multiprocessing.connection.wait([q._reader, pidfd], timeout)
            if pidfd in ready:
                self._bury(watch)
                return True
            if not ready:
                return False
            timeout = 0.0
        try:
            item = q.get(timeout=timeout) if timeout > 0 else q.get_nowait()
            if isinstance(item, bytes):  # pickled by the producer (_pickle_item)
                item = ForkingPickler.loads(item)
        except queue.Empty:
            return False
        except (OSError, EOFError) as exc:  # the producer's fd server is gone: the item is lost
            self.lost += 1
            log.debug("consumer %d: lost a tensor whose producer is gone (%s)", self.consumer, exc)
            return True
        self.received += 1
        key = (item.producer_id, item.message_id, item.tensor_index)
        self._ack(item.slot, key)
        self.buffer.add(key, item.tensor, item.request_id)
        return True

    def _ack(self, slot: int, key: TensorKey) -> None:
        if 0 <= slot < len(self.queues.acks):
            self.queues.acks[slot].put_nowait(key)

    def open(
        self, dtype: torch.dtype, shape: tuple[int, ...], handle: dict[str, Any]
    ) -> torch.Tensor:
        producer = _handle_field(handle, "producer", str)
        pid = _handle_field(handle, "pid", int)
        message_id = _handle_field(handle, "message", int)
        index = _handle_field(handle, "index", int)
        device = _handle_field(handle, "device", str)
        what = f"tensor {index} of producer {producer} message {message_id}"
        try:
            self.buffer.advance(producer, message_id)
        except ValueError as exc:
            raise DecodeError(str(exc)) from exc
        self.buffer.expire()
        self._watch(producer, pid)
        deadline = self.clock() + self.config.get_timeout_s
        while (entry := self.buffer.take((producer, message_id, index))) is None:
            if producer in self.gone:
                raise ProducerGone(
                    f"consumer {self.consumer}: {what}: the producer's process (pid {pid}) "
                    f"exited before delivering it ({self.lost} tensors lost)"
                )
            remaining = deadline - self.clock()
            if remaining <= 0 or not self._receive(remaining, watch=producer):
                raise ReceiverStarved(
                    f"consumer {self.consumer}: {what} did not arrive within "
                    f"{self.config.get_timeout_s} s ({len(self.buffer)} other tensors buffered, "
                    f"{self.lost} lost)"
                )
        t = entry.tensor
        for field, got, declared in (
            ("dtype", t.dtype, dtype),
            ("shape", tuple(t.shape), tuple(shape)),
            ("device", str(t.device), device),
        ):
            if got != declared:
                raise DecodeError(f"{what}: {field} {got} arrived, the message declares {declared}")
        _mark_received(t)
        return t
