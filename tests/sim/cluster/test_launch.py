"""Rank processes and the run's store: the store listens on loopback only."""

from __future__ import annotations

import pathlib

import pytest

from mx_sim.cluster.launch import host_store


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) in LISTEN state on ``port``."""
    found = []
    for table in ("tcp", "tcp6"):
        for line in pathlib.Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


@pytest.mark.reliability
def test_the_run_store_listens_on_loopback_only():
    store, addr = host_store("t")
    try:
        assert listening(addr.port) == ["0100007F"]  # 127.0.0.1; not [::] or 0.0.0.0
        client = addr.connect()
        client.set("k", b"v")
        assert store.get("t/k") == b"v"  # PrefixStore key, through the master
    finally:
        del store


def _own_listeners() -> list[str]:
    """Local addresses of every TCP socket of this process in LISTEN state."""
    import os

    inodes = set()
    for fd in pathlib.Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in pathlib.Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.append(fields[1].rsplit(":", 1)[0])
    return found


@pytest.mark.reliability
def test_simulator_nixl_agents_listen_on_loopback_only(monkeypatch):
    import pytest
    import torch

    from mx_reference.transport import desc_of
    from mx_reference.transport.nixl import nixl_available
    from mx_sim.sim_transport import make_transport

    if not nixl_available():
        pytest.skip("nixl wheel not installed")
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    before = set(_own_listeners())
    a, b = make_transport("nixl", "lo-a"), make_transport("nixl", "lo-b", serves=False)
    try:
        src, dst = torch.arange(256, dtype=torch.uint8), torch.zeros(256, dtype=torch.uint8)
        a.register([src])
        b.register([dst])
        b.pull([(dst, desc_of(src).on(b.add_remote(a.metadata())))], 10)
        assert torch.equal(src, dst)
        new = [addr for addr in _own_listeners() if addr not in before]
        assert new and set(new) == {"0100007F"}, new  # UCX listened on every interface before
    finally:
        b.close()
        a.close()
