"""Shared pieces of the transport tests: transport factories and the spawned-process roles.

Roles run in children started with ``torch.multiprocessing`` (spawn); they exchange agent
metadata and addresses through a ``torch.distributed.FileStore`` and report back through it
as msgspec-encoded records (never pickle).
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

import msgspec
import torch
import torch.distributed as dist

from mx_reference.transport import MemDesc, RemoteDesc, Transport, desc_of
from mx_sim.sim_transport import FaultPlan, make_transport

STORE_TIMEOUT = timedelta(seconds=30)
WAIT_S = 10.0
SRC_BYTES = 1 << 20
# (offset, length) slices of the source read into the same offsets of the destination.
# 0..3 are adjacent on both sides and coalesce into one descriptor.
SLICES = [(0, 4096), (4096, 1000), (5096, 24), (5120, 3000), (40_000, 777), (100_001, 65_536)]
PREPPED = [(200_000 + 4096 * i, 4096) for i in range(16)]
PICK = [1, 3, 4, 9, 15]


def transport_of(kind: str, name: str, faults: FaultPlan | None = None) -> Transport:
    """``sim``, ``nixl``, or ``nixl-pull-only`` (an agent without NIXL's progress thread,
    progressing inside wait)."""
    if kind == "nixl-pull-only":
        return make_transport("nixl", name, serves=False)
    return make_transport(kind, name, faults=faults)


def source_bytes() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 256, (SRC_BYTES,), dtype=torch.uint8, generator=g)  # [SRC_BYTES]


def expected_destination() -> torch.Tensor:
    """What the reader's buffer holds after the differential scenario."""
    src, dst = source_bytes(), torch.zeros(SRC_BYTES, dtype=torch.uint8)
    for off, n in SLICES + [PREPPED[i] for i in PICK]:
        dst[off : off + n] = src[off : off + n]
    return dst


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def store(path: str) -> dist.FileStore:
    s = dist.FileStore(path, -1)  # -1: no cleanup when the children exit
    s.set_timeout(STORE_TIMEOUT)
    return s


class Report(msgspec.Struct):
    digest: str = ""
    calls: list[str] = []
    error: str = ""


def run_role(role: str, kind: str, store_path: str, faults: FaultPlan | None = None) -> None:
    """Entry point of a spawned child: run ``role`` and put a Report under ``report/<role>``."""
    s = store(store_path)
    report = Report()
    try:
        if role == "source":
            report = _source(kind, s, faults)
        elif role == "reader":
            report = _reader(kind, s)
        else:
            raise ValueError(f"unknown role {role!r}")
    except Exception as exc:  # reported to the parent, which fails the test with it
        report.error = f"{type(exc).__name__}: {exc}"
    s.set(f"report/{role}", msgspec.msgpack.encode(report))


def _source(kind: str, s: dist.FileStore, faults: FaultPlan | None) -> Report:
    t = transport_of(kind, "source", faults)
    src = source_bytes()
    late = torch.ones(4096, dtype=torch.uint8)
    t.register([src])
    md = t.metadata()
    t.register([late])  # after publishing: must stay invisible to the reader
    s.set("md", md)
    s.set("addr", msgspec.msgpack.encode([desc_of(src).addr, desc_of(late).addr]))
    t.wait_notif("reader", b"v1", WAIT_S)  # the READ's completion notification
    t.add_remote(s.get("md/reader"))
    t.send_notif("reader", b"ack")
    t.wait_notif("reader", b"done", WAIT_S)
    t.close()
    return Report(digest(src), t.calls)


def _reader(kind: str, s: dist.FileStore) -> Report:
    t = transport_of(kind, "reader")
    dst = torch.zeros(SRC_BYTES, dtype=torch.uint8)
    t.register([dst])
    s.set("md/reader", t.metadata())
    peer = t.add_remote(s.get("md"))
    src_addr, late_addr = msgspec.msgpack.decode(s.get("addr"))
    remote = MemDesc(src_addr, SRC_BYTES)
    try:
        t.make_read([(dst[:16], RemoteDesc(peer, late_addr, 16))])
    except ValueError:  # RegionNotFound: registered after the metadata was taken
        pass
    else:
        raise AssertionError("a region registered after the metadata was readable")
    pairs = [(dst[o : o + n], remote.slice(o, n).on(peer)) for o, n in SLICES]
    t.pull(pairs, WAIT_S)
    local = t.prep_local([dst[o : o + n] for o, n in PREPPED])
    far = t.prep_remote(peer, [remote.slice(o, n) for o, n in PREPPED])
    h = t.make_prepped_read(local, PICK, far, PICK, notif=b"v1")
    t.post(h)
    t.wait(h, WAIT_S)
    t.release(h)
    t.wait_notif(peer, b"ack", WAIT_S)
    t.send_notif(peer, b"done")
    t.close()
    return Report(digest(dst), t.calls)
