"""The transport protocol refit pulls weights through: handles, errors and the contract.

A transport is one *agent*: it registers local memory, publishes metadata (bytes) describing
what it registered, loads peers' metadata, and posts one-sided READs of (local view, remote
descriptor) pairs. :class:`Transport` holds everything both implementations share — argument
validation, the handle state machine, release order, the call log and every blocking wait with
its deadline — and leaves the data movement to a handful of ``_primitive`` methods:

* ``mx_reference.transport.nixl.NixlTransport`` — real NIXL (UCX backend).
* ``mx_sim.sim_transport.SimTransport`` — processes exchanging bytes through shared memory, with
  deterministic fault injection.

Contract (enforced for both): register before publishing metadata (a region registered later
is not visible to a peer holding older metadata); no memory registered twice; every local view
lies inside a locally registered region and every remote descriptor inside a region the peer
published; lengths match pairwise; local destinations of one transfer do not overlap; one
active post per handle; release order is transfers, then prepared lists, then remote agents,
then registrations. Violations raise; nothing is left half-done.

Lifecycle of a pull::

    reg = t.register(tensors)                  # once, large, early
    peer = t.add_remote(peer_metadata)         # bytes from the side channel
    h = t.make_read([(dest_view, RemoteDesc(peer, addr, n))], notif=b"step-3")
    t.post(h); t.wait(h, timeout=10.0); t.release(h)
    # or: t.pull(pairs, timeout=10.0)          # the same four calls, coalesced
"""

from __future__ import annotations

import bisect
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mx_reference.transport.memory import (
    LocalView,
    MemDesc,
    ReadPair,
    RemoteDesc,
    coalesce,
    desc_of,
    overlaps,
)

POLL_INTERVAL_S = 0.0005


class TransportError(RuntimeError):
    """Base class of every transport failure raised at run time."""


class TransferFailed(TransportError):
    """The transfer reported an error (NIXL state ``ERR`` or a backend exception)."""


class TransferTimeout(TransportError, TimeoutError):
    """A transfer or notification did not arrive before its deadline."""


class RemoteGone(TransportError):
    """The peer agent died or disconnected while we depended on it."""


class RegionNotFound(TransportError, ValueError):
    """A descriptor is not inside memory registered (locally) or published (by the peer)."""


class HandleBusy(TransportError):
    """A handle was posted while active, or released while still in use."""


@dataclass(eq=False)
class Registration:
    """Memory registered by :meth:`Transport.register`; pass it back to ``deregister``.

    ``regions`` are read after registering: a transport may move a tensor's storage (the
    simulator moves it into shared memory), so take addresses from here or from the tensors
    after ``register`` returns, never before.
    """

    regions: tuple[MemDesc, ...]
    impl: Any = field(repr=False, default=None)
    released: bool = False


@dataclass(eq=False)
class PreppedList:
    """Descriptors prepared once (``prep_local`` / ``prep_remote``) and selected by index."""

    agent: str | None  # None for the local side
    descs: tuple[MemDesc, ...]
    impl: Any = field(repr=False, default=None)
    users: int = 0  # live transfer handles made from this list
    released: bool = False


@dataclass(eq=False)
class XferHandle:
    """A READ request: post it, wait for it, release it. Re-postable once done."""

    agent: str
    local: tuple[MemDesc, ...]
    remote: tuple[MemDesc, ...]
    notif: bytes
    impl: Any = field(repr=False, default=None)
    prepped: tuple[PreppedList, ...] = ()
    state: str = "idle"  # idle | active | done | failed | released

    @property
    def nbytes(self) -> int:
        return sum(d.length for d in self.local)


class Transport(ABC):
    """One agent. Subclasses implement the ``_primitive`` methods; the public API lives here.

    ``calls`` records the name of every public operation in order (polling excluded), so two
    implementations running one scenario can be compared call for call.
    """

    def __init__(self, name: str, mem_type: str):
        if not name:
            raise ValueError("transport agent name must be non-empty")
        self.name = name
        self.mem_type = mem_type
        self.calls: list[str] = []
        self._regions: list[tuple[MemDesc, Registration]] = []  # sorted by (device, addr)
        self._remotes: dict[str, int] = {}  # agent -> live handles and lists referring to it
        self._handles: list[XferHandle] = []
        self._lists: list[PreppedList] = []
        self._inbox: dict[str, list[bytes]] = {}

    # -- primitives ------------------------------------------------------------------------

    @abstractmethod
    def _register(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[MemDesc, ...], Any]: ...

    @abstractmethod
    def _deregister(self, reg: Registration) -> None: ...

    @abstractmethod
    def _metadata(self) -> bytes: ...

    @abstractmethod
    def _add_remote(self, metadata: bytes) -> str: ...

    @abstractmethod
    def _remove_remote(self, agent: str) -> None: ...

    @abstractmethod
    def _prep(self, plist: PreppedList) -> Any: ...

    @abstractmethod
    def _release_list(self, plist: PreppedList) -> None: ...

    @abstractmethod
    def _make_read(self, h: XferHandle) -> Any: ...

    @abstractmethod
    def _make_prepped_read(
        self, h: XferHandle, local: PreppedList, li: list[int], remote: PreppedList, ri: list[int]
    ) -> Any: ...

    @abstractmethod
    def _post(self, h: XferHandle) -> None: ...

    @abstractmethod
    def _check(self, h: XferHandle) -> str:
        """ "DONE" or "PROC"; raises ``TransferFailed`` / ``RemoteGone`` on failure."""

    @abstractmethod
    def _release_xfer(self, h: XferHandle, cancel: bool) -> None: ...

    @abstractmethod
    def _send_notif(self, agent: str, msg: bytes) -> None: ...

    @abstractmethod
    def _poll_notifs(self) -> dict[str, list[bytes]]: ...

    @abstractmethod
    def _close(self) -> None: ...

    # -- memory ----------------------------------------------------------------------------

    def register(self, tensors: Sequence[torch.Tensor]) -> Registration:
        """Register contiguous tensors (few and large: each registration is a kernel call)."""
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if not tensors:
            raise ValueError("register: no tensors given")
        wanted = [desc_of(t, f"register: tensor {i}") for i, t in enumerate(tensors)]
        for i, d in enumerate(wanted):
            if d.length == 0:
                raise ValueError(f"register: tensor {i} is empty")
            for j in range(i):
                if overlaps(d, wanted[j]):
                    raise ValueError(f"register: tensors {j} and {i} share memory")
            if (hit := self._region_overlapping(d)) is not None:
                raise ValueError(
                    f"register: tensor {i} at {d.addr:#x}+{d.length} overlaps memory already "
                    f"registered at {hit.addr:#x}+{hit.length}"
                )
        self.calls.append("register")
        regions, impl = self._register(list(tensors))
        reg = Registration(regions, impl)
        for r in regions:
            bisect.insort(self._regions, (r, reg), key=lambda e: (e[0].device_id, e[0].addr))
        return reg

    def deregister(self, reg: Registration) -> None:
        """Deregister after every transfer using the memory was released."""
        if reg.released:
            raise ValueError("deregister: registration already released")
        for h in self._handles:
            if any(self._owner(d) is reg for d in h.local):
                raise HandleBusy("deregister: a live transfer handle still uses this memory")
        for plist in self._lists:
            if plist.agent is None and any(self._owner(d) is reg for d in plist.descs):
                raise HandleBusy("deregister: a prepared list still uses this memory")
        self.calls.append("deregister")
        self._deregister(reg)
        reg.released = True
        self._regions = [e for e in self._regions if e[1] is not reg]

    def registered(self) -> list[MemDesc]:
        """Every locally registered region, sorted by (device, address)."""
        return [r for r, _ in self._regions]

    # -- metadata --------------------------------------------------------------------------

    def metadata(self) -> bytes:
        """This agent's metadata: connection info plus the regions registered *so far*."""
        self.calls.append("metadata")
        return self._metadata()

    def add_remote(self, metadata: bytes) -> str:
        """Load a peer's metadata; returns its agent name. Reloading refreshes its regions."""
        if not isinstance(metadata, bytes | bytearray | memoryview):
            raise TypeError(f"add_remote: metadata must be bytes, got {type(metadata).__name__}")
        self.calls.append("add_remote")
        agent = self._add_remote(bytes(metadata))
        self._remotes.setdefault(agent, 0)
        return agent

    def remove_remote(self, agent: str) -> None:
        """Forget a peer (and disconnect) once no handle or prepared list refers to it."""
        if agent not in self._remotes:
            raise ValueError(f"remove_remote: unknown agent {agent!r}")
        if self._remotes[agent]:
            raise HandleBusy(
                f"remove_remote: {self._remotes[agent]} handle(s)/list(s) still refer to {agent!r}"
            )
        self.calls.append("remove_remote")
        self._remove_remote(agent)
        del self._remotes[agent]

    # -- transfers -------------------------------------------------------------------------

    def make_read(self, pairs: Sequence[ReadPair], notif: bytes = b"") -> XferHandle:
        """A READ of each remote descriptor into its local view (one transfer, one agent).

        The peer gets ``notif`` (if non-empty) once the whole transfer has landed.
        """
        if not pairs:
            raise ValueError("make_read: no descriptor pairs")
        local = [_local_desc(view, i) for i, (view, _) in enumerate(pairs)]
        remote = [r for _, r in pairs]
        agent = self._check_remote_descs(remote, "make_read")
        self._check_pairs(local, [r.mem for r in remote], "make_read")
        self.calls.append("make_read")
        h = XferHandle(agent, tuple(local), tuple(r.mem for r in remote), bytes(notif))
        h.impl = self._make_read(h)
        self._adopt(h)
        return h

    def prep_local(self, descs: Sequence[LocalView]) -> PreppedList:
        """Prepare local descriptors (inside registered memory) for ``make_prepped_read``."""
        local = tuple(_local_desc(d, i) for i, d in enumerate(descs))
        for i, d in enumerate(local):
            self._require_local(d, f"prep_local: descriptor {i}")
        return self._new_list(None, local)

    def prep_remote(self, agent: str, descs: Sequence[MemDesc]) -> PreppedList:
        """Prepare descriptors inside memory ``agent`` published."""
        if agent not in self._remotes:
            raise ValueError(f"prep_remote: unknown agent {agent!r} (add_remote first)")
        for i, d in enumerate(descs):
            if not isinstance(d, MemDesc):
                raise TypeError(f"prep_remote: descriptor {i} must be a MemDesc")
        return self._new_list(agent, tuple(descs))

    def make_prepped_read(
        self,
        local: PreppedList,
        local_idx: Sequence[int],
        remote: PreppedList,
        remote_idx: Sequence[int],
        notif: bytes = b"",
    ) -> XferHandle:
        """A READ of ``remote.descs[remote_idx[k]]`` into ``local.descs[local_idx[k]]``."""
        if local.agent is not None or remote.agent is None:
            raise ValueError("make_prepped_read: expected (local list, remote list)")
        if local.released or remote.released:
            raise ValueError("make_prepped_read: prepared list already released")
        li, ri = [int(i) for i in local_idx], [int(i) for i in remote_idx]
        if not li or len(li) != len(ri):
            raise ValueError(
                f"make_prepped_read: {len(li)} local vs {len(ri)} remote indices (need equal, > 0)"
            )
        for side, idx, n in (("local", li, len(local.descs)), ("remote", ri, len(remote.descs))):
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise ValueError(f"make_prepped_read: {side} index {bad[0]} outside [0, {n})")
        loc = [local.descs[i] for i in li]
        rem = [remote.descs[i] for i in ri]
        self._check_pairs(loc, rem, "make_prepped_read")
        self.calls.append("make_prepped_read")
        h = XferHandle(remote.agent, tuple(loc), tuple(rem), bytes(notif), prepped=(local, remote))
        h.impl = self._make_prepped_read(h, local, li, remote, ri)
        for plist in h.prepped:
            plist.users += 1
        self._adopt(h)
        return h

    def post(self, h: XferHandle) -> None:
        """Start ``h``. Raises ``HandleBusy`` while a previous post is still in flight."""
        if h.state == "released":
            raise ValueError("post: handle already released")
        if h.state == "active":
            raise HandleBusy("post: handle is still active (one post per handle at a time)")
        self.calls.append("post")
        h.state = "active"
        try:
            self._post(h)
        except TransportError:
            h.state = "failed"
            raise

    def state(self, h: XferHandle) -> str:
        """Poll once: "DONE" or "PROC"; raises on failure."""
        if h.state == "done":
            return "DONE"
        if h.state not in ("active", "failed"):  # a failed handle raises its error again
            raise ValueError(f"state: handle is {h.state}, not posted")
        try:
            status = self._check(h)
        except TransportError:
            h.state = "failed"
            raise
        if status == "DONE":
            h.state = "done"
        return status

    def wait(self, h: XferHandle, timeout: float) -> None:
        """Poll until ``h`` is done; ``TransferTimeout`` after ``timeout`` seconds."""
        self.calls.append("wait")
        deadline = time.monotonic() + timeout
        while self.state(h) != "DONE":
            if time.monotonic() > deadline:
                raise TransferTimeout(
                    f"{self.name}: READ of {h.nbytes} bytes from {h.agent!r} not done after "
                    f"{timeout:.3g} s"
                )
            time.sleep(POLL_INTERVAL_S)

    def release(self, h: XferHandle | PreppedList, cancel: bool = False) -> None:
        """Release a transfer handle (``cancel=True`` if it may still be active) or a list."""
        if isinstance(h, PreppedList):
            self._release_prepped(h)
            return
        if h.state == "released":
            raise ValueError("release: handle already released")
        if h.state == "active" and not cancel:
            raise HandleBusy("release: transfer still active (wait for it, or cancel=True)")
        self.calls.append("release")
        self._release_xfer(h, cancel=h.state == "active")
        h.state = "released"
        self._handles.remove(h)
        self._remotes[h.agent] -= 1
        for plist in h.prepped:
            plist.users -= 1

    def pull(self, pairs: Sequence[ReadPair], timeout: float, notif: bytes = b"") -> int:
        """Coalesce, read, wait and release in one call; returns the bytes moved."""
        descs = [(_local_desc(v, i), r) for i, (v, r) in enumerate(pairs)]
        h = self.make_read(coalesce(descs), notif)
        try:
            self.post(h)
            self.wait(h, timeout)
        finally:
            self.release(h, cancel=True)
        return h.nbytes

    # -- notifications ---------------------------------------------------------------------

    def send_notif(self, agent: str, msg: bytes) -> None:
        """Send a standalone notification to a peer whose metadata was added."""
        if agent not in self._remotes:
            raise ValueError(f"send_notif: unknown agent {agent!r} (add_remote first)")
        self.calls.append("send_notif")
        self._send_notif(agent, bytes(msg))

    def notifs(self) -> dict[str, list[bytes]]:
        """Every notification received and not yet consumed, by sender (non-blocking)."""
        self._drain()
        out, self._inbox = self._inbox, {}
        return out

    def wait_notif(self, agent: str, tag: bytes, timeout: float) -> bytes:
        """Consume the first notification from ``agent`` starting with ``tag``.

        Raises ``TransferTimeout`` after ``timeout`` seconds. Notifications are hints, not
        authentication: use unique tags (e.g. a version).
        """
        self.calls.append("wait_notif")
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            msgs = self._inbox.get(agent, [])
            for i, msg in enumerate(msgs):
                if msg.startswith(tag):
                    return msgs.pop(i)
            if time.monotonic() > deadline:
                raise TransferTimeout(
                    f"{self.name}: no notification {tag!r} from {agent!r} within {timeout:.3g} s"
                )
            time.sleep(POLL_INTERVAL_S)

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Release everything in contract order (handles, lists, remotes, memory)."""
        for h in list(self._handles):
            self.release(h, cancel=True)
        for plist in list(self._lists):
            self._release_prepped(plist)
        for agent in list(self._remotes):
            self.remove_remote(agent)
        for reg in {id(r): r for _, r in self._regions}.values():
            self.deregister(reg)
        self._close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _new_list(self, agent: str | None, descs: tuple[MemDesc, ...]) -> PreppedList:
        if not descs:
            raise ValueError("prep: no descriptors")
        self.calls.append("prep")
        plist = PreppedList(agent, descs)
        plist.impl = self._prep(plist)
        self._lists.append(plist)
        if agent is not None:
            self._remotes[agent] += 1
        return plist

    def _drain(self) -> None:
        for agent, msgs in self._poll_notifs().items():
            self._inbox.setdefault(agent, []).extend(msgs)

    def _adopt(self, h: XferHandle) -> None:
        self._handles.append(h)
        self._remotes[h.agent] += 1

    def _release_prepped(self, plist: PreppedList) -> None:
        if plist.released:
            raise ValueError("release: prepared list already released")
        if plist.users:
            raise HandleBusy(f"release: {plist.users} transfer handle(s) still use this list")
        self.calls.append("release_list")
        self._release_list(plist)
        plist.released = True
        self._lists.remove(plist)
        if plist.agent is not None:
            self._remotes[plist.agent] -= 1

    def _region_overlapping(self, d: MemDesc) -> MemDesc | None:
        for r, _ in self._regions:
            if overlaps(r, d):
                return r
        return None

    def _owner(self, d: MemDesc) -> Registration | None:
        keys = [(r.device_id, r.addr) for r, _ in self._regions]
        i = bisect.bisect_right(keys, (d.device_id, d.addr)) - 1
        if i >= 0 and self._regions[i][0].contains(d):
            return self._regions[i][1]
        return None

    def _require_local(self, d: MemDesc, what: str) -> None:
        if self._owner(d) is None:
            raise RegionNotFound(
                f"{what}: local range {d.addr:#x}+{d.length} (device {d.device_id}) is not inside "
                f"a region registered with {self.name!r}"
            )

    def _check_remote_descs(self, remote: Sequence[RemoteDesc], what: str) -> str:
        for i, r in enumerate(remote):
            if not isinstance(r, RemoteDesc):
                raise TypeError(f"{what}: pair {i}: remote must be a RemoteDesc")
        agents = {r.agent for r in remote}
        if len(agents) != 1:
            raise ValueError(f"{what}: one transfer reads from one agent, got {sorted(agents)}")
        agent = agents.pop()
        if agent not in self._remotes:
            raise ValueError(f"{what}: unknown agent {agent!r} (add_remote first)")
        return agent

    def _check_pairs(self, local: Sequence[MemDesc], remote: Sequence[MemDesc], what: str) -> None:
        for i, (lo, re) in enumerate(zip(local, remote, strict=True)):
            if lo.length != re.length:
                raise ValueError(
                    f"{what}: pair {i}: local length {lo.length} != remote length {re.length}"
                )
            if lo.length <= 0 or re.addr < 0:
                raise ValueError(f"{what}: pair {i}: empty or negative range")
            self._require_local(lo, f"{what}: pair {i}")
        ordered = sorted(range(len(local)), key=lambda i: (local[i].device_id, local[i].addr))
        for a, b in zip(ordered, ordered[1:], strict=False):
            if overlaps(local[a], local[b]):
                raise ValueError(f"{what}: pairs {a} and {b} write overlapping local memory")


def _local_desc(view: LocalView, i: int) -> MemDesc:
    return view if isinstance(view, MemDesc) else desc_of(view, f"pair {i}: local view")
