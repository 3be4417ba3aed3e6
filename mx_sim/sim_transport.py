"""SimTransport: the CPU stand-in for NIXL, moving real bytes between processes.

Registering a tensor moves its storage into a named shared-memory file (torch's
``file_system`` sharing, in place, so every view follows; addresses change, which is why
:class:`~mx_reference.transport.base.Registration` reports them *after* registering). The
agent metadata (msgspec, never pickle) lists each region with the file that backs it, as of
the moment it was taken.

Each agent runs a small server on a Unix socket, playing the NIC: a READ is a request to the
peer holding the memory, which copies from its region file into the reader's region file and
replies. That makes the source side an active party, so a :class:`FaultPlan` on it can fail,
delay, corrupt, or kill the process in the middle of a transfer, deterministically. The reader
sees each fault through the same exceptions the NIXL transport raises: ``TransferFailed``,
``TransferTimeout`` (from its deadline), silently wrong bytes (corruption is silent on real
hardware too: verify digests above the transport), and ``RemoteGone`` (socket closed).

Tests and CI run it on shared machines, so a server serves only clients that present the
random token in its metadata (whoever can read the run's store), and it writes only into
files of torch's shared-memory namespace (``/dev/shm/torch_*``, one path component): a read
naming any other destination is refused with an error reply, and nothing is written.
"""

from __future__ import annotations

import hmac
import mmap
import os
import secrets
import socket
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from mx_reference.backends import NIXL_DRAM
from mx_reference.transport.base import (
    MemDesc,
    PreppedList,
    RegionNotFound,
    Registration,
    RemoteGone,
    TransferFailed,
    Transport,
    TransportError,
    XferHandle,
)

_SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class FaultPlan:
    """Faults this agent injects into the transfers it *serves* (reads other agents post).

    Transfers are counted from 0 in the order this agent receives them.

    * ``fail_on``: reply with an error instead of copying.
    * ``delay_on``/``delay_s``: wait before copying (``delay_on=None`` delays every transfer);
      a reader with a shorter deadline times out.
    * ``corrupt_on``/``corrupt_bytes``: copy, then flip that many bytes (spread evenly) of the
      destination. Silent, like a real bit flip: digests above the transport catch it.
    * ``die_on``/``die_after_bytes``: copy that many bytes, then ``os._exit(1)`` the process.
    """

    fail_on: int | None = None
    delay_on: int | None = None
    delay_s: float = 0.0
    corrupt_on: int | None = None
    corrupt_bytes: int = 1
    die_on: int | None = None
    die_after_bytes: int = 0

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.corrupt_bytes < 1 or self.die_after_bytes < 0:
            raise ValueError(f"FaultPlan: negative delay or byte count in {self}")


class _Region(msgspec.Struct, frozen=True):
    addr: int
    length: int
    device_id: int
    file: str  # name under /dev/shm
    offset: int  # of addr inside the file


class _Meta(msgspec.Struct, frozen=True):
    name: str
    pid: int
    sock: str
    regions: list[_Region]
    token: str  # a client must present it: only holders of this metadata may connect


class _Hello(msgspec.Struct, tag=True):
    name: str
    token: str


class _Read(msgspec.Struct, tag=True):
    xfer: int
    notif: bytes
    # (remote addr, length, remote device id, destination file, destination offset)
    items: list[tuple[int, int, int, str, int]]


class _Notif(msgspec.Struct, tag=True):
    msg: bytes


class _Reply(msgspec.Struct, tag=True):
    xfer: int
    error: str = ""
    not_found: bool = False


_Msg = _Hello | _Read | _Notif | _Reply
_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(_Meta)
_msg_decoder = msgspec.msgpack.Decoder(_Msg)
_LEN = struct.Struct("<I")


def _send(sock: socket.socket, msg: _Msg) -> None:
    payload = _encoder.encode(msg)
    sock.sendall(_LEN.pack(len(payload)) + payload)


def _recv(sock: socket.socket) -> _Msg | None:
    """One framed message, or None once the peer closed the connection."""
    header = _recv_exact(sock, _LEN.size)
    if header is None:
        return None
    payload = _recv_exact(sock, _LEN.unpack(header)[0])
    if payload is None:
        return None
    try:
        return _msg_decoder.decode(payload)
    except msgspec.DecodeError:
        return None  # not our protocol: the connection is dropped


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


@dataclass
class _Xfer:
    # (remote addr, length, remote device id, destination file, destination offset) per pair
    items: list[tuple[int, int, int, str, int]]
    id: int = 0  # of the latest post; replies are matched on it


class _Files:
    """Shared-memory files mapped by name, each once per process."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def view(self, name: str, offset: int, length: int) -> memoryview:
        if not shm_name_ok(name):
            raise ValueError(f"{name!r} is not a file of torch's shared-memory namespace")
        with self._lock:
            m = self._maps.get(name)
            if m is None:
                with open(os.path.join(_SHM_DIR, name.lstrip("/")), "r+b") as f:
                    m = self._maps[name] = mmap.mmap(f.fileno(), 0)
        if offset + length > len(m):
            raise ValueError(f"range {offset}+{length} is outside shared file {name}")
        return memoryview(m)[offset : offset + length]


class _Peer:
    """Our connection to one remote agent, with a thread collecting its replies."""

    def __init__(self, owner: SimTransport, meta: _Meta):
        self.meta = meta
        self.alive = True
        self.replies: dict[int, _Reply] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(meta.sock)
            _send(self.sock, _Hello(owner.name, meta.token))
        except OSError as exc:
            self.sock.close()
            raise RemoteGone(f"{owner.name}: cannot reach agent {meta.name!r}: {exc}") from exc
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while (msg := _recv(self.sock)) is not None:
            assert isinstance(msg, _Reply)
            self.replies[msg.xfer] = msg
        self.alive = False

    def send(self, msg: _Msg) -> None:
        try:
            _send(self.sock, msg)
        except OSError as exc:
            self.alive = False
            raise RemoteGone(f"agent {self.meta.name!r} is gone: {exc}") from exc

    def close(self) -> None:
        self.sock.close()


class SimTransport(Transport):
    """A :class:`~mx_reference.transport.base.Transport` over shared memory and Unix sockets.

    ``faults`` scripts what happens to the transfers this agent serves. Works between threads
    of one process and between processes on one host; DRAM only. ``device_id`` is the device
    its registered regions report, standing in for an agent whose memory is on ``cuda:N``: a
    read must name the device of the region it reads, as it must on NIXL VRAM, so a caller
    that drops a remote device id fails here too.
    """

    def __init__(self, name: str, faults: FaultPlan | None = None, *, device_id: int = 0):
        super().__init__(name, NIXL_DRAM)
        self.faults = faults or FaultPlan()
        self.device_id = device_id
        self.served = 0  # transfers served so far (the FaultPlan's counter)
        self._files = _Files()
        self._served_regions: list[_Region] = []
        self._peers: dict[str, _Peer] = {}
        self._next_xfer = 0
        # Linux abstract socket namespace: no file to leak when a process dies.
        self._sock_path = f"\0mxsim-{os.getpid()}-{uuid.uuid4().hex}"
        self._token = secrets.token_hex(16)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self._sock_path)
        self._server.listen()
        self._conns: list[socket.socket] = []
        self._notif_lock = threading.Lock()
        self._notif_buf: dict[str, list[bytes]] = {}
        threading.Thread(target=self._accept, daemon=True).start()

    # -- primitives: memory and metadata ----------------------------------------------------

    def _register(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[MemDesc, ...], Any]:
        for i, t in enumerate(tensors):  # check all before moving any storage
            if t.device.type != "cpu":
                raise ValueError(
                    f"register: tensor {i} is on {t.device}; SimTransport is DRAM only"
                )
        regions = []
        for i, t in enumerate(tensors):
            storage = t.untyped_storage()
            try:
                _, file, _ = storage._share_filename_cpu_()
            except RuntimeError as exc:
                raise ValueError(
                    f"register: tensor {i} storage cannot move to named shared memory ({exc})"
                ) from exc
            # Addresses are read only now: sharing moved the storage. torch puts a refcount
            # header in front of the data; its size is whatever the file holds beyond it.
            header = os.path.getsize(os.path.join(_SHM_DIR, file.decode().lstrip("/")))
            header -= storage.nbytes()
            offset = header + t.data_ptr() - storage.data_ptr()
            regions.append(_Region(t.data_ptr(), t.nbytes, self.device_id, file.decode(), offset))
        self._served_regions.extend(regions)
        return tuple(MemDesc(r.addr, r.length, r.device_id) for r in regions), regions

    def _deregister(self, reg: Registration) -> None:
        gone = {id(r) for r in reg.impl}
        self._served_regions = [r for r in self._served_regions if id(r) not in gone]

    def _metadata(self) -> bytes:
        meta = _Meta(
            self.name, os.getpid(), self._sock_path, list(self._served_regions), self._token
        )
        return _encoder.encode(meta)

    def _add_remote(self, metadata: bytes) -> str:
        try:
            meta = _meta_decoder.decode(metadata)
        except msgspec.DecodeError as exc:
            raise ValueError(f"add_remote: not SimTransport agent metadata ({exc})") from exc
        old = self._peers.get(meta.name)
        if old is not None and old.meta.sock == meta.sock and old.alive:
            old.meta = meta  # refreshed region list, same connection
        else:
            if old is not None:
                old.close()
            self._peers[meta.name] = _Peer(self, meta)
        return meta.name

    def _remove_remote(self, agent: str) -> None:
        self._peers.pop(agent).close()

    # -- primitives: transfers -------------------------------------------------------------

    def _prep(self, plist: PreppedList) -> Any:
        if plist.agent is not None:
            self._remote_regions(plist.agent, plist.descs, "prep_remote")
        return None

    def _release_list(self, plist: PreppedList) -> None:
        pass

    def _make_read(self, h: XferHandle) -> Any:
        self._remote_regions(h.agent, h.remote, "make_read")
        items = []
        for lo, re in zip(h.local, h.remote, strict=True):
            region = self._local_region(lo)
            at = region.offset + lo.addr - region.addr
            items.append((re.addr, re.length, re.device_id, region.file, at))
        return _Xfer(items)

    def _make_prepped_read(
        self, h: XferHandle, local: PreppedList, li: list[int], remote: PreppedList, ri: list[int]
    ) -> Any:
        return self._make_read(h)

    def _post(self, h: XferHandle) -> None:
        peer = self._peer(h.agent)
        peer.replies.pop(h.impl.id, None)  # a re-post waits for its own reply
        self._next_xfer += 1
        h.impl.id = self._next_xfer
        peer.send(_Read(h.impl.id, h.notif, h.impl.items))

    def _check(self, h: XferHandle) -> str:
        peer = self._peers.get(h.agent)
        reply = peer.replies.get(h.impl.id) if peer is not None else None
        if reply is None:
            if peer is None or not peer.alive:
                raise RemoteGone(
                    f"{self.name}: agent {h.agent!r} disconnected during a READ of {h.nbytes} bytes"
                )
            return "PROC"
        if reply.not_found:
            raise RegionNotFound(f"{self.name}: {h.agent!r} rejected the READ: {reply.error}")
        if reply.error:
            raise TransferFailed(f"{self.name}: READ from {h.agent!r} failed: {reply.error}")
        return "DONE"

    def _release_xfer(self, h: XferHandle, cancel: bool) -> None:
        peer = self._peers.get(h.agent)
        if peer is not None:
            peer.replies.pop(h.impl.id, None)

    def _send_notif(self, agent: str, msg: bytes) -> None:
        self._peer(agent).send(_Notif(msg))

    def _poll_notifs(self) -> dict[str, list[bytes]]:
        with self._notif_lock:
            out, self._notif_buf = self._notif_buf, {}
        return out

    def _close(self) -> None:
        self._server.close()
        for conn in self._conns:
            conn.close()

    # -- helpers ---------------------------------------------------------------------------

    def _peer(self, agent: str) -> _Peer:
        peer = self._peers[agent]
        if not peer.alive:
            raise RemoteGone(f"{self.name}: agent {agent!r} is gone")
        return peer

    def _remote_regions(self, agent: str, descs: Sequence[MemDesc], what: str) -> None:
        regions = self._peers[agent].meta.regions
        for i, d in enumerate(descs):
            if not any(_inside(r, d) for r in regions):
                raise RegionNotFound(
                    f"{what}: descriptor {i} ({d.addr:#x}+{d.length}) is not in memory {agent!r} "
                    f"registered before publishing the metadata we hold"
                )

    def _local_region(self, d: MemDesc) -> _Region:
        return next(r for r in self._served_regions if _inside(r, d))

    # -- the server side (runs on this agent's threads) --------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        hello = _recv(conn)
        if not isinstance(hello, _Hello) or not hmac.compare_digest(hello.token, self._token):
            conn.close()  # no token, no service: only holders of our metadata may read
            return
        while (msg := _recv(conn)) is not None:
            if isinstance(msg, _Notif):
                self._deliver(hello.name, msg.msg)
            elif isinstance(msg, _Read):
                reply = self._serve_read(msg)
                if not reply.error and msg.notif:
                    self._deliver(hello.name, msg.notif)
                try:
                    _send(conn, reply)
                except OSError:
                    return

    def _deliver(self, sender: str, msg: bytes) -> None:
        with self._notif_lock:
            self._notif_buf.setdefault(sender, []).append(msg)

    def _serve_read(self, req: _Read) -> _Reply:
        k, plan = self.served, self.faults
        self.served += 1
        if plan.delay_on in (None, k):
            time.sleep(plan.delay_s)
        if k == plan.fail_on:
            return _Reply(req.xfer, error=f"injected failure on served transfer {k}")
        budget = plan.die_after_bytes if k == plan.die_on else None
        copies = []
        for addr, length, device, file, offset in req.items:
            if not shm_name_ok(file):
                return _Reply(req.xfer, error=f"destination {file!r} is outside /dev/shm/torch_*")
            want = MemDesc(addr, length, device)
            src = next((r for r in self._served_regions if _inside(r, want)), None)
            if src is None:
                return _Reply(
                    req.xfer,
                    error=f"{addr:#x}+{length} on device {device} is not registered",
                    not_found=True,
                )
            copies.append((src, addr, length, file, offset))
        for src, addr, length, file, offset in copies:
            n = length if budget is None else min(length, budget)
            dst = self._files.view(file, offset, n)
            dst[:] = self._files.view(src.file, src.offset + addr - src.addr, n)
            if budget is not None:
                budget -= n
                if budget == 0:
                    os._exit(1)  # die mid-transfer: the peer sees its socket close
        if budget is not None:
            os._exit(1)
        if k == plan.corrupt_on:
            self._corrupt(copies, plan.corrupt_bytes)
        return _Reply(req.xfer)

    def _corrupt(self, copies: list[tuple[_Region, int, int, str, int]], n: int) -> None:
        total = sum(c[2] for c in copies)
        for j in range(min(n, total)):
            pos = j * total // min(n, total)
            for _, _, length, file, offset in copies:
                if pos < length:
                    byte = self._files.view(file, offset + pos, 1)
                    byte[0] ^= 0xFF
                    break
                pos -= length


TRANSPORTS = ("sim", "nixl")


def make_transport(
    kind: str,
    name: str,
    *,
    faults: FaultPlan | None = None,
    serves: bool = True,
    device_id: int = 0,
) -> Transport:
    """The one transport factory of the simulator: a ``sim`` agent (optionally with a
    ``FaultPlan`` and a stand-in device id) or a real ``nixl`` agent on CPU memory.

    ``serves=False`` is a pull-only agent; for NIXL that drops the progress poller a serving
    agent needs (``NixlConfig.progress``: "none" rather than "poll"). NIXL agents here keep
    UCX on loopback (``UCX_NET_DEVICES=lo``: without it UCX listens on every interface); set
    ``UCX_NET_DEVICES`` to name another interface.
    """
    if kind == "sim":
        return SimTransport(name, faults, device_id=device_id)
    if kind != "nixl":
        raise ValueError(f"transport {kind!r} not in {TRANSPORTS}")
    if faults is not None or device_id:
        raise ValueError("faults and device ids are simulated by the 'sim' transport only")
    from mx_reference.transport.nixl import DEFAULT_UCX_ENV, NixlConfig, NixlTransport
    from mx_sim.cpu_mock import CpuMockBackend

    loopback = {**DEFAULT_UCX_ENV, "UCX_NET_DEVICES": "lo"}  # applied only where unset
    return NixlTransport(
        name, CpuMockBackend(), NixlConfig(progress="poll" if serves else "none", ucx_env=loopback)
    )


def shm_name_ok(name: str) -> bool:
    """A file torch's ``file_system`` sharing made: one name under /dev/shm, ``torch_*``."""
    base = name.removeprefix("/")
    return base.startswith("torch_") and "/" not in base and ".." not in base


def _inside(r: _Region, d: MemDesc) -> bool:
    return (
        r.device_id == d.device_id and r.addr <= d.addr and d.addr + d.length <= r.addr + r.length
    )


__all__ = ["TRANSPORTS", "FaultPlan", "SimTransport", "TransportError", "make_transport"]
