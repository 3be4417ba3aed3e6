"""Version registry on TCPStore, HashStore and FileStore; concurrent publishers in processes."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta

import pytest
import torch.distributed as dist

from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.wire import ShardDescriptor, make_manifest


def manifest(rank: int, world: int, version: int, *, model="m", rows=4):
    d = ShardDescriptor(name="w", global_shape=(rows,), dtype="float32", nbytes=rows * 4)
    return make_manifest(model, version, [d], tp=(rank, world))


@pytest.fixture(params=["hash", "file", "tcp"])
def store(request, tmp_path):
    if request.param == "hash":
        return dist.HashStore()
    if request.param == "file":
        return dist.FileStore(str(tmp_path / "store"), 1)
    return dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))


def test_version_is_invisible_until_every_rank_published(store):
    reg = VersionRegistry(store, timeout=2)
    assert [reg.publish(manifest(r, 3, 7)) for r in (0, 2)] == [False, False]
    assert reg.discover("m") == []
    assert reg.publish(manifest(1, 3, 7)) is True
    assert reg.discover("m") == [7]
    assert [m.tp_rank for m in reg.manifests("m", 7)] == [0, 1, 2]


def test_a_rank_that_never_publishes_keeps_the_version_hidden(store):
    reg = VersionRegistry(store, timeout=2)
    for r in range(2):
        reg.publish(manifest(r, 2, 1))
    reg.publish(manifest(0, 2, 2))  # rank 1 never publishes version 2
    assert reg.discover("m") == [1] and reg.wait_for_version("m", 1) == 1
    with pytest.raises(TimeoutError, match="no committed version >= 2"):
        reg.wait_for_version("m", 2, timeout=0.05)
    with pytest.raises(LookupError, match="version 2"):
        reg.manifests("m", 2)


def test_republish_is_idempotent_and_a_conflict_changes_nothing(store):
    reg = VersionRegistry(store, timeout=2)
    assert reg.publish(manifest(0, 2, 3)) is False
    assert reg.publish(manifest(0, 2, 3)) is False  # same bytes: no double count
    with pytest.raises(ValueError, match="different content"):
        reg.publish(manifest(0, 2, 3, rows=8))
    with pytest.raises(ValueError, match="world 3"):
        reg.publish(manifest(0, 3, 3))
    assert reg.discover("m") == []
    assert reg.publish(manifest(1, 2, 3)) is True
    assert reg.manifests("m", 3)[0].tensors[0].global_shape == (4,)


def test_discover_newest_first_and_retire(store):
    reg = VersionRegistry(store, timeout=2)
    for v in (1, 3, 2):
        reg.publish(manifest(0, 1, v))
    reg.publish(manifest(0, 1, 9, model="other"))
    assert reg.discover("m") == [3, 2, 1] and reg.discover("m", min_version=2) == [3, 2]
    assert reg.retire_older_than("m", keep=1) == [2, 1]
    assert reg.discover("m") == [3] and reg.discover("other") == [9]
    assert reg.retire("m", 2) is False
    reg.publish(manifest(0, 1, 2))  # a retired version's keys are gone: it can be published again
    assert reg.discover("m") == [3, 2]


def test_bad_model_id_and_timeout():
    with pytest.raises(ValueError, match="timeout"):
        VersionRegistry(dist.HashStore(), timeout=0)
    with pytest.raises(ValueError, match="model_id"):
        VersionRegistry(dist.HashStore()).discover("a/b")


def _publisher(port: int, rank: int, world: int, versions: list[int]) -> None:
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20))
    reg = VersionRegistry(store, timeout=20)
    for v in versions:
        reg.publish(manifest(rank, world, v))


@pytest.mark.multiprocess
@pytest.mark.xdist_group("refit_core")
@pytest.mark.timeout(60)
def test_concurrent_publishers_over_tcpstore():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=20))
    world, versions = 4, [1, 2, 3]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_publisher, args=(store.port, r, world, versions)) for r in range(world)
    ]
    try:
        for p in procs:
            p.start()
        reg = VersionRegistry(store, timeout=40)
        assert reg.wait_for_version("m", 3) == 3
        for p in procs:
            p.join(timeout=40)
        assert [p.exitcode for p in procs] == [0] * world
        assert reg.discover("m") == [3, 2, 1]
        assert [m.tp_rank for m in reg.manifests("m", 2)] == list(range(world))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


@pytest.mark.reliability
def test_a_garbage_index_is_a_value_error_and_a_refit_error_in_refit():
    from mx_reference.refit.receiver import RefitError
    from mx_sim.refit.rig import RefitRig, RigConfig

    with RefitRig(RigConfig(timeout_s=1.0)) as rig:
        dist.PrefixStore("mx/refit/tiny/", rig.store).set("index", b"\xc1garbage")
        with pytest.raises(ValueError, match="registry field 'index'"):
            rig.registry.discover("tiny")
        with pytest.raises(RefitError, match="registry field 'index'"):
            rig.receiver.refit(1)


@pytest.mark.reliability
def test_an_index_naming_an_uncommitted_version_waits_the_registry_timeout_only():
    import time

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=20))
    reg = VersionRegistry(store, timeout=0.5)
    dist.PrefixStore("mx/refit/m/", store).set("index", b"\x91\x05")  # [5], keys never written
    start = time.monotonic()
    with pytest.raises(LookupError, match="registry key 'v5/world' missing after 0.5 s"):
        reg.manifests("m", 5)
    assert time.monotonic() - start < 5  # the registry's 0.5 s, not the store's 20 s
