"""The transport contract, checked in one process against SimTransport and real NIXL (UCX, DRAM)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transport_helpers import transport_of

from mx_reference.transport import (
    HandleBusy,
    MemDesc,
    RegionNotFound,
    RemoteDesc,
    TransferTimeout,
    coalesce,
    desc_of,
)
from mx_reference.transport.nixl import NixlTransport, nixl_available

NO_NIXL = pytest.mark.skipif(not nixl_available(), reason="no nixl wheel")
KINDS = ["sim", pytest.param("nixl", marks=NO_NIXL), pytest.param("nixl-pull-only", marks=NO_NIXL)]
N = 1 << 16


@pytest.fixture(params=KINDS)
def pair(request):
    """(reader, source, peer name, source tensor, reader tensor), both registered. A source
    serves reads, so it always keeps NIXL's progress thread."""
    src_kind = "nixl" if request.param == "nixl-pull-only" else request.param
    src_t, dst_t = transport_of(src_kind, "src"), transport_of(request.param, "dst")
    src = torch.arange(N, dtype=torch.int32).to(torch.uint8)  # [N]
    dst = torch.zeros(N, dtype=torch.uint8)  # [N]
    src_t.register([src])
    dst_t.register([dst])
    peer = dst_t.add_remote(src_t.metadata())
    yield dst_t, src_t, peer, src, dst
    dst_t.close()
    src_t.close()


def test_pull_lands_bytes_and_notifies(pair):
    t, src_t, peer, src, dst = pair
    assert not torch.equal(dst, src)
    moved = t.pull([(dst, desc_of(src).on(peer))], timeout=10, notif=b"v7")
    assert moved == N
    assert torch.equal(dst, src)
    assert src_t.wait_notif("dst", b"v7", timeout=10) == b"v7"


def test_typed_views_and_slices(pair):
    t, _, peer, src, dst = pair
    part = dst[1000:1512].view(torch.float32)  # [128]
    t.pull([(part, desc_of(src[5000:5512]).on(peer))], timeout=10)
    assert torch.equal(dst[1000:1512], src[5000:5512])
    assert int(dst[:1000].sum()) == 0 and int(dst[1512:].sum()) == 0


def test_prepped_lists_read_only_selected_slices(pair):
    t, _, peer, src, dst = pair
    k = 64
    size = N // k
    local = t.prep_local([dst[i * size : (i + 1) * size] for i in range(k)])
    remote = t.prep_remote(peer, [desc_of(src).slice(i * size, size) for i in range(k)])
    picked = list(range(0, k, 3))
    h = t.make_prepped_read(local, picked, remote, picked[::-1])
    t.post(h)
    t.wait(h, 10)
    for i, j in zip(picked, picked[::-1], strict=True):
        assert torch.equal(dst[i * size : (i + 1) * size], src[j * size : (j + 1) * size])
    assert int(dst[size : 2 * size].sum()) == 0  # index 1 was not selected
    t.post(h)  # a finished handle can be posted again
    t.wait(h, 10)
    with pytest.raises(HandleBusy):
        t.release(local)  # the handle still uses it: handles go first
    t.release(h)
    t.release(local)
    t.release(remote)


def test_register_same_memory_twice_raises(pair):
    t, _, _, _, dst = pair
    before = t.registered()
    with pytest.raises(ValueError, match="overlaps memory already registered"):
        t.register([dst[100:200]])
    with pytest.raises(ValueError, match="tensors 0 and 1 share memory"):
        t.register([torch.zeros(8), torch.zeros(8)][:1] * 2)
    assert t.registered() == before


def test_bad_pairs_raise_and_leave_no_handle(pair):
    t, _, peer, src, dst = pair
    outside = torch.zeros(16, dtype=torch.uint8)
    remote = desc_of(src).on(peer)
    with pytest.raises(RegionNotFound, match="not inside a region registered"):
        t.make_read([(outside, RemoteDesc(peer, remote.addr, 16))])
    with pytest.raises(ValueError, match="pair 0: local length 32 != remote length 16"):
        t.make_read([(dst[:32], RemoteDesc(peer, remote.addr, 16))])
    with pytest.raises(ValueError, match="pair 0: local view: a transfer view must be contiguous"):
        t.make_read([(dst.view(256, 256)[:, 0], RemoteDesc(peer, remote.addr, 256))])
    with pytest.raises(ValueError, match="pairs 0 and 1 write overlapping local memory"):
        t.make_read(
            [
                (dst[:64], remote.mem.slice(0, 64).on(peer)),
                (dst[32:96], remote.mem.slice(64, 64).on(peer)),
            ]
        )
    with pytest.raises(ValueError, match="unknown agent 'nobody'"):
        t.make_read([(dst[:8], RemoteDesc("nobody", remote.addr, 8))])
    with pytest.raises(RegionNotFound):
        t.make_read([(dst[:16], RemoteDesc(peer, remote.addr + N - 8, 16))])  # past the end
    assert t._handles == []
    t.remove_remote(peer)  # nothing refers to the peer: removable


def test_metadata_only_exposes_regions_registered_before_it(pair):
    t, src_t, peer, _, dst = pair
    late = torch.full((256,), 7, dtype=torch.uint8)
    src_t.register([late])
    with pytest.raises(RegionNotFound):
        t.make_read([(dst[:256], desc_of(late).on(peer))])
    t.add_remote(src_t.metadata())  # fresh metadata exposes it
    t.pull([(dst[:256], desc_of(late).on(peer))], timeout=10)
    assert torch.equal(dst[:256], late)


def test_handle_state_machine_and_release_order(pair):
    t, _, peer, src, dst = pair
    h = t.make_read([(dst, desc_of(src).on(peer))])
    t.post(h)
    with pytest.raises(HandleBusy, match="one post per handle"):
        t.post(h)
    with pytest.raises(HandleBusy, match="still active"):
        t.release(h)
    with pytest.raises(HandleBusy):
        t.remove_remote(peer)
    reg = next(iter({id(r): r for _, r in t._regions}.values()))
    with pytest.raises(HandleBusy, match="live transfer handle"):
        t.deregister(reg)
    t.wait(h, 10)
    t.release(h)
    with pytest.raises(ValueError, match="already released"):
        t.post(h)
    assert torch.equal(dst, src)
    t.deregister(reg)
    assert t.registered() == []


def test_notifications_and_deadline(pair):
    t, src_t, peer, _, _ = pair
    src_t.add_remote(t.metadata())
    if isinstance(t, NixlTransport) and t.config.progress == "none":
        with pytest.raises(ValueError, match="send_notif needs progress driven beside the caller"):
            t.send_notif(peer, b"hello-1")
        return
    t.send_notif(peer, b"hello-1")
    t.send_notif(peer, b"other")
    assert src_t.wait_notif("dst", b"hello", timeout=10) == b"hello-1"
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match="no notification b'never'"):
        src_t.wait_notif("dst", b"never", timeout=0.2)
    assert time.monotonic() - start < 2
    assert src_t.notifs() == {"dst": [b"other"]}


@given(
    cuts=st.lists(st.integers(0, 4096), min_size=2, max_size=40, unique=True),
    keep=st.lists(st.booleans(), min_size=40, max_size=40),
    gaps=st.lists(st.sampled_from([0, 0, 1, 7]), min_size=40, max_size=40),
)
def test_coalesce_preserves_bytes(cuts, keep, gaps):
    """Coalesced pairs land the same bytes in the same places, merging exactly the runs that
    are adjacent on both sides."""
    cuts = sorted(cuts)
    src = np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8)
    pairs, pos = [], 0
    for a, b, k, gap in zip(cuts, cuts[1:], keep, gaps, strict=False):
        if k:
            pos += gap  # local layout: adjacent only where gap == 0
            pairs.append((MemDesc(pos, b - a), RemoteDesc("p", a, b - a)))
            pos += b - a

    def apply(ps):
        out = np.zeros(8192 + 4096, dtype=np.uint8)
        for lo, re in ps:
            out[lo.addr : lo.end] = src[re.addr : re.end]
        return out

    merged = coalesce(pairs[::-1])
    assert np.array_equal(apply(merged), apply(pairs))
    breaks = sum(
        1
        for (l0, r0), (l1, r1) in zip(pairs, pairs[1:], strict=False)
        if r0.end != r1.addr or l0.end != l1.addr
    )
    assert len(merged) == (breaks + 1 if pairs else 0)


def test_coalesce_keeps_non_adjacent_apart():
    a = (MemDesc(0, 8), RemoteDesc("p", 0, 8))
    gap_local = (MemDesc(9, 8), RemoteDesc("p", 8, 8))
    other_agent = (MemDesc(8, 8), RemoteDesc("q", 8, 8))
    assert coalesce([a, gap_local]) == [a, gap_local]
    assert len(coalesce([a, other_agent])) == 2
    assert coalesce([a, (MemDesc(8, 4), RemoteDesc("p", 8, 4))]) == [
        (MemDesc(0, 12), RemoteDesc("p", 0, 12))
    ]


def test_memdesc_slice_bounds():
    d = MemDesc(100, 50)
    assert d.slice(10, 40) == MemDesc(110, 40)
    with pytest.raises(ValueError, match=r"slice \[40, 60\) is outside a range of 50 bytes"):
        d.slice(40, 20)
    with pytest.raises(TypeError, match="expected a torch.Tensor or MemDesc"):
        desc_of([1, 2])  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not nixl_available(), reason="no nixl wheel")
def test_vram_registration_and_read():
    from mx_reference.backends import CudaBackend
    from mx_reference.transport.nixl import NixlTransport

    with NixlTransport("gpu-src", CudaBackend()) as a, NixlTransport("gpu-dst", CudaBackend()) as b:
        assert a.mem_type == "VRAM"
        src = torch.arange(1 << 20, device="cuda", dtype=torch.float32)  # [1M]
        dst = torch.zeros_like(src)
        assert a.register([src]).regions[0].device_id == src.device.index
        b.register([dst])
        peer = b.add_remote(a.metadata())
        b.pull([(dst, desc_of(src).on(peer))], timeout=30)
        torch.cuda.synchronize()
        assert torch.equal(dst, src)
