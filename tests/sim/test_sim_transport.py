"""SimTransport fault injection: every fault surfaces in the reader, within its deadline."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from transport_helpers import SRC_BYTES, source_bytes, store

from mx_reference.transport import RemoteDesc, RemoteGone, TransferFailed, TransferTimeout, desc_of
from mx_sim.sim_transport import FaultPlan, SimTransport

N = 1 << 16


def _agents(plan: FaultPlan):
    src_t, dst_t = SimTransport("src", plan), SimTransport("dst")
    src = torch.randint(0, 256, (N,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dst = torch.zeros(N, dtype=torch.uint8)
    src_t.register([src])
    dst_t.register([dst])
    return src_t, dst_t, dst_t.add_remote(src_t.metadata()), src, dst


def test_fail_on_kth_transfer_only():
    src_t, t, peer, src, dst = _agents(FaultPlan(fail_on=1))
    try:
        t.pull([(dst[:100], desc_of(src[:100]).on(peer))], timeout=5)
        with pytest.raises(TransferFailed, match="injected failure on served transfer 1"):
            t.pull([(dst[100:200], desc_of(src[100:200]).on(peer))], timeout=5)
        assert int(dst[100:200].sum()) == 0  # nothing landed
        t.pull([(dst[100:200], desc_of(src[100:200]).on(peer))], timeout=5)
        assert torch.equal(dst[:200], src[:200])
        assert t._handles == []  # pull released the failed handle
    finally:
        t.close()
        src_t.close()


def test_delay_beyond_deadline_times_out():
    src_t, t, peer, src, dst = _agents(FaultPlan(delay_on=0, delay_s=1.0))
    try:
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="not done after 0.2 s"):
            t.pull([(dst, desc_of(src).on(peer))], timeout=0.2)
        assert time.monotonic() - start < 0.9
        time.sleep(1.0)  # the delayed copy still lands (cancel is best effort, as in NIXL)
        dst.zero_()
        t.pull([(dst, desc_of(src).on(peer))], timeout=5)  # transfer 1: no delay
        assert torch.equal(dst, src)
    finally:
        t.close()
        src_t.close()


@pytest.mark.parametrize("n", [1, 5])
def test_corrupt_flips_exactly_n_bytes_of_transfer_k(n):
    src_t, t, peer, src, dst = _agents(FaultPlan(corrupt_on=0, corrupt_bytes=n))
    try:
        pairs = [
            (dst[:1000], desc_of(src[:1000]).on(peer)),
            (dst[5000:6000], desc_of(src[7000:8000]).on(peer)),
        ]
        t.pull(pairs, timeout=5)  # silent, like a real bit flip
        expected = torch.zeros_like(dst)
        expected[:1000], expected[5000:6000] = src[:1000], src[7000:8000]
        assert int((dst != expected).sum()) == n
        t.pull(pairs, timeout=5)  # transfer 1 is clean
        assert torch.equal(dst, expected)
    finally:
        t.close()
        src_t.close()


def test_fault_plan_rejects_negative_values():
    with pytest.raises(ValueError, match="negative delay"):
        FaultPlan(delay_s=-1)


def _faulty_source(path: str, plan: FaultPlan) -> None:
    s = store(path)
    t = SimTransport("source", plan)
    src = source_bytes()
    t.register([src])
    s.set("md", t.metadata())
    s.set("addr", str(src.data_ptr()))
    s.wait(["finish"], timedelta(seconds=30))  # dies before this in the "die" scenario
    t.close()


@pytest.mark.multiprocess
@pytest.mark.xdist_group("transport")
@pytest.mark.timeout(60)
def test_scripted_faults_across_processes(tmp_path):
    """fail, delay, corrupt, then die mid-transfer: each seen by the reader in time."""
    plan = FaultPlan(
        fail_on=0,
        delay_on=1,
        delay_s=2.0,
        corrupt_on=2,
        corrupt_bytes=3,
        die_on=3,
        die_after_bytes=1000,
    )
    path = str(tmp_path / "store")
    proc = mp.get_context("spawn").Process(target=_faulty_source, args=(path, plan), daemon=True)
    proc.start()
    t = SimTransport("reader")
    try:
        s = store(path)
        dst = torch.zeros(SRC_BYTES, dtype=torch.uint8)
        t.register([dst])
        peer = t.add_remote(s.get("md"))
        remote = RemoteDesc(peer, int(s.get("addr")), SRC_BYTES)
        whole = [(dst, remote)]
        with pytest.raises(TransferFailed):
            t.pull(whole, timeout=5)
        with pytest.raises(TransferTimeout):
            t.pull(whole, timeout=0.3)
        time.sleep(2.0)  # let the delayed transfer finish before the next one is served
        dst.zero_()
        t.pull(whole, timeout=5)
        assert int((dst != source_bytes()).sum()) == 3
        dst.zero_()
        start = time.monotonic()
        with pytest.raises(RemoteGone, match="disconnected during a READ"):
            t.pull(whole, timeout=10)
        assert time.monotonic() - start < 5
        assert torch.equal(dst[:1000], source_bytes()[:1000])  # the part copied before dying
        assert int(dst[1000:].sum()) == 0
        proc.join(10)
        assert proc.exitcode == 1
        with pytest.raises(RemoteGone):  # and stays gone
            t.pull(whole, timeout=1)
    finally:
        t.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)


def _raw_client(agent: SimTransport, token: str):
    import socket

    from mx_sim.sim_transport import _Hello, _meta_decoder, _send

    meta = _meta_decoder.decode(agent.metadata())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(meta.sock)
    _send(sock, _Hello("intruder", token if token else meta.token))
    return sock, meta


@pytest.mark.reliability
def test_a_client_without_the_metadata_token_is_not_served():
    from mx_sim.sim_transport import _Read, _recv, _send

    src_t, dst_t, _, src, _ = _agents(FaultPlan())
    try:
        sock, meta = _raw_client(src_t, token="0" * 32)
        sock.settimeout(5)
        try:
            _send(sock, _Read(1, b"", [(meta.regions[0].addr, 8, 0, meta.regions[0].file, 0)]))
        except OSError:
            pass  # already closed
        assert _recv(sock) is None  # dropped: no reply, nothing served
        sock.close()
        assert src_t.served == 0
    finally:
        dst_t.close()
        src_t.close()


@pytest.mark.reliability
def test_a_read_into_a_file_outside_torch_shared_memory_is_refused(tmp_path):
    from mx_sim.sim_transport import _Read, _recv, _send

    src_t, dst_t, _, src, _ = _agents(FaultPlan())
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    try:
        sock, meta = _raw_client(src_t, token="")
        sock.settimeout(5)
        escape = f"../..{victim}"  # /dev/shm/../../<tmp>/victim
        _send(sock, _Read(7, b"", [(meta.regions[0].addr, 8, 0, escape, 0)]))
        reply = _recv(sock)
        sock.close()
        assert reply is not None and "outside /dev/shm/torch_*" in reply.error
        assert victim.read_bytes() == b"untouched"
    finally:
        dst_t.close()
        src_t.close()
