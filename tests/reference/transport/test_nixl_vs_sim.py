"""Differential test: one two-process scenario on real NIXL and on SimTransport.

Register, publish metadata, a region registered too late, many sliced reads (some coalesced),
prepared lists with index selection, notifications both ways. Both implementations must land
bit-identical bytes (equal to what the parent computes) and make the same calls in order.
"""

from __future__ import annotations

import msgspec
import pytest
import torch.multiprocessing as mp
from transport_helpers import Report, digest, expected_destination, run_role, source_bytes, store

from mx_reference.transport.nixl import nixl_available

KINDS = ["sim", "nixl"]


def _run_pair(ctx, kind: str, path: str) -> list:
    return [
        ctx.Process(target=run_role, args=(role, kind, path), daemon=True)
        for role in ("source", "reader")
    ]


@pytest.mark.multiprocess
@pytest.mark.xdist_group("transport")
@pytest.mark.timeout(90)
@pytest.mark.skipif(not nixl_available(), reason="nixl wheel not installed")
def test_nixl_and_sim_agree(tmp_path):
    ctx = mp.get_context("spawn")
    procs = {kind: _run_pair(ctx, kind, str(tmp_path / f"store-{kind}")) for kind in KINDS}
    try:
        for pair in procs.values():
            for p in pair:
                p.start()
        reports = {}
        for kind in KINDS:
            s = store(str(tmp_path / f"store-{kind}"))
            reports[kind] = {
                role: msgspec.msgpack.decode(s.get(f"report/{role}"), type=Report)
                for role in ("source", "reader")
            }
        for pair in procs.values():
            for p in pair:
                p.join(30)
                assert p.exitcode == 0, f"{p.name} exit code {p.exitcode}"
    finally:
        for pair in procs.values():
            for p in pair:
                if p.is_alive():
                    p.kill()
                p.join(5)

    for kind, by_role in reports.items():
        for role, r in by_role.items():
            assert not r.error, f"{kind} {role}: {r.error}"
    expected = digest(expected_destination())
    assert expected != digest(expected_destination().zero_())  # the reads change the buffer
    assert reports["nixl"]["reader"].digest == reports["sim"]["reader"].digest == expected
    assert reports["nixl"]["source"].digest == reports["sim"]["source"].digest
    assert reports["sim"]["source"].digest == digest(source_bytes())  # reads leave it alone
    for role in ("source", "reader"):
        assert reports["nixl"][role].calls == reports["sim"][role].calls
    assert reports["sim"]["reader"].calls.count("make_read") == 2  # the late region + pull
