"""The shared tensor channel between real spawned processes: sharing, crashes, cleanup, fan-in."""

from __future__ import annotations

import gc
import os
import signal
import time
from multiprocessing import resource_tracker

import pytest
import torch
import torch.multiprocessing as tmp
from ipc_helpers import consumer, fd_count, producer, shm_entries

from mx_reference.ipc import SharedChannelConfig, TensorQueues
from mx_sim.ipc_workers import Plan
from mx_sim.scenarios.ipc import run_fan_in

pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("ipc")]


class Pair:
    """One producer and one consumer process, always reaped in ``close``."""

    def __init__(self, n: int, take: int, hold: bool, config: SharedChannelConfig):
        ctx = tmp.get_context("spawn")
        self.queues = TensorQueues.create(1, 1, ctx)
        # one results queue per child: a child SIGKILLed right after its put can die holding the
        # queue's shared write lock, and every other writer to that queue then blocks forever
        self.headers, self.from_producer, self.from_consumer = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.stop, self._stop_w = ctx.Pipe(duplex=False)
        self.go = ctx.Event()
        self.producer = ctx.Process(
            target=producer,
            args=(self.queues, self.headers, self.from_producer, self.stop, n, config),
            daemon=True,
        )
        self.consumer = ctx.Process(
            target=consumer,
            args=(self.queues, self.headers, self.from_consumer, self.go, take, hold, config),
            daemon=True,
        )

    def expect(self, kind: str, timeout: float = 30.0):
        """The next report of ``kind`` from the process that sends it."""
        results = self.from_producer if kind in ("sent", "drained") else self.from_consumer
        got = results.get(timeout=timeout)
        assert got[0] == kind, got
        return got

    def close(self) -> None:
        self._stop_w.send(True)
        for p in (self.producer, self.consumer):
            if p.pid is None:
                continue
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (self.headers, self.from_producer, self.from_consumer):
            q.close()
            q.cancel_join_thread()
        self.queues.close()
        self.stop.close()
        self._stop_w.close()


def run_pair(n: int, take: int, hold: bool, config: SharedChannelConfig, body) -> None:
    resource_tracker.ensure_running()  # its pipe stays open for the life of this process
    gc.collect()
    fds_before = fd_count()
    pair = Pair(n, take, hold, config)
    pids: list[int] = []
    try:
        pair.consumer.start()
        pair.expect("ready")  # the consumer is up before the producer's TTL clock starts
        pair.producer.start()
        pids = [pair.producer.pid, pair.consumer.pid]
        body(pair)
    finally:
        pair.close()
    del pair
    gc.collect()
    assert fd_count() == fds_before
    assert shm_entries([os.getpid(), *pids]) == []


@pytest.mark.timeout(60)
def test_cpu_tensors_shared_not_copied_and_released():
    def body(pair):
        pair.expect("sent")
        pair.go.set()
        _, report = pair.expect("consumer")
        assert [v[0] for v in report["values"]] == list(range(6))
        assert report["values"][0][1:] == (-1.0, 0.0)  # producer wrote after sending: aliased
        assert report["values"][5][1:] == (5.0, 5.0)
        before, holding, after = report["maps"]
        assert holding >= before + 6 and after == before  # mapped while held, unmapped after
        assert report["fds"][0] == report["fds"][1]  # fds closed once mapped
        assert pair.expect("drained")[1:] == (0, 0)  # every tensor acked, none expired

    run_pair(n=6, take=6, hold=False, config=SharedChannelConfig(), body=body)


@pytest.mark.reliability
@pytest.mark.timeout(60)
def test_sigkilled_consumer_unacked_tensors_expire_and_nothing_leaks():
    config = SharedChannelConfig(ttl_s=1.0)

    def body(pair):
        pair.expect("sent")
        pair.go.set()
        _, report = pair.expect("consumer")
        assert len(report["values"]) == 2
        os.kill(report["pid"], signal.SIGKILL)
        assert pair.expect("drained")[1:] == (
            3,
            0,
        )  # 2 acked, 3 never taken: released after the TTL

    run_pair(n=5, take=2, hold=True, config=config, body=body)


@pytest.mark.reliability
@pytest.mark.timeout(60)
def test_sigkilled_producer_fails_its_messages_at_once_not_per_timeout():
    config = SharedChannelConfig(get_timeout_s=5.0)  # three waits of it would take 15 s

    def body(pair):
        _, pid = pair.expect("sent")
        os.kill(pid, signal.SIGKILL)
        pair.producer.join(timeout=10)
        pair.go.set()
        start = time.monotonic()
        _, report = pair.expect("consumer")
        assert report["values"] == []
        assert report["lost"] == 3
        assert "exited before delivering it (3 tensors lost)" in report["error"]
        assert time.monotonic() - start < 3

    run_pair(n=3, take=3, hold=False, config=config, body=body)


@pytest.mark.timeout(90)
def test_fan_in_scenario_3x2_exactly_once():
    result = run_fan_in(3, 2, Plan(messages=20, seed=1, disabled_producers=(2,)))
    assert result.passed, result.detail
    assert result.details["tensors_delivered"] == result.details["tensors_expected"] > 50
    assert result.details["fallbacks"]["disabled"] > 0  # producer 2 went inline, visibly
    assert result.bytes_moved > 1 << 20


@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_cuda_tensor_through_cuda_ipc():
    from ipc_helpers import cuda_round_trip

    ctx = tmp.get_context("spawn")
    queues = TensorQueues.create(1, 1, ctx)
    inbox, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=cuda_round_trip, args=(queues, inbox, results), daemon=True)
    try:
        child.start()
        from mx_reference.ipc import Encoder, SharedTensorSender

        sender = SharedTensorSender(queues, 0)
        t = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
        frames = Encoder(sender).encode({"t": t})
        assert len(frames) == 1  # only the header: the tensor went through CUDA IPC
        inbox.put([bytes(f) for f in frames])
        ok, device = results.get(timeout=30)
        assert ok and device.startswith("cuda")
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()
        queues.close()
