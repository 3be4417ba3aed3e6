"""Rank processes and the run's store: the store listens on loopback only."""

from __future__ import annotations

import pathlib

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


def test_the_run_store_listens_on_loopback_only():
    store, addr = host_store("t")
    try:
        assert listening(addr.port) == ["0100007F"]  # 127.0.0.1; not [::] or 0.0.0.0
        client = addr.connect()
        client.set("k", b"v")
        assert store.get("t/k") == b"v"  # PrefixStore key, through the master
    finally:
        del store
