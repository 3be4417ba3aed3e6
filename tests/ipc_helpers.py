"""Child processes and resource counters for the tensor IPC multiprocess tests."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import torch

from mx_reference.ipc import (
    Decoder,
    Encoder,
    ReceiverStarved,
    SharedChannelConfig,
    SharedTensorReceiver,
    SharedTensorSender,
    TensorQueues,
    request_scope,
    setup_sharing,
)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def shm_entries(pids: list[int]) -> list[str]:
    """``/dev/shm`` entries torch created for these processes (``torch_<pid>_*``)."""
    prefixes = tuple(f"torch_{pid}_" for pid in pids)
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefixes)]


def shared_mappings() -> int:
    """Mappings of torch shared segments in this process."""
    with open("/proc/self/maps") as f:
        return sum("/torch_" in line for line in f)


def producer(
    queues: TensorQueues, headers: Any, results: Any, stop: Any, n: int, config: SharedChannelConfig
) -> None:
    """Send ``n`` messages of one 1 MiB tensor to consumer 0, write into the first tensor after
    sending it, then keep reaping acks until ``stop`` (a pipe end) becomes readable.

    ``stop`` is a pipe, not an ``Event``: a process SIGKILLed inside ``Event.wait`` leaves the
    event's condition waiting for it forever."""
    setup_sharing(config)
    sender = SharedTensorSender(queues, 0, config)
    encoder = Encoder(sender)
    for seq in range(n):
        t = torch.full((256 * 1024,), float(seq))
        with request_scope(sender, f"r{seq}"):
            frames = encoder.encode({"seq": seq, "t": t})
        if seq == 0:
            t[0] = -1.0  # after sending: the consumer shares this memory
        headers.put([bytes(f) for f in frames])
    queues.data[0].close()
    queues.data[0].join_thread()  # flushed: every tensor is in the pipe
    headers.close()
    headers.join_thread()
    results.put(("sent", os.getpid()))
    while sender.pending and not stop.poll(0.02):  # keep every tensor alive until acked or expired
        sender.reap()
    results.put(("drained", sender.expired, sender.pending))
    stop.poll(60)
    queues.close()


def consumer(
    queues: TensorQueues,
    headers: Any,
    results: Any,
    go: Any,
    take: int,
    hold: bool,
    config: SharedChannelConfig,
) -> None:
    """Once ``go`` is set, decode ``take`` messages and report resource counts while holding them
    and after dropping them; then sleep if ``hold`` (to be SIGKILLed) or exit."""
    setup_sharing(config)
    receiver = SharedTensorReceiver(queues, 0, config)
    decoder = Decoder(source=receiver)
    fds0, maps0 = fd_count(), shared_mappings()
    results.put(("ready",))
    go.wait(30)
    held, error = [], ""
    for _ in range(take):
        try:
            held.append(decoder.decode(headers.get(timeout=30)))
        except ReceiverStarved as exc:
            error = str(exc)
    values = [(m["seq"], float(m["t"][0]), float(m["t"][1])) for m in held]
    maps_holding = shared_mappings()
    del held
    gc.collect()
    receiver.close()  # its pidfd watching the producer
    report = {
        "values": values,
        "fds": (fds0, fd_count()),
        "maps": (maps0, maps_holding, shared_mappings()),
        "lost": receiver.lost,
        "error": error,
        "pid": os.getpid(),
    }
    results.put(("consumer", report))
    if hold:
        time.sleep(600)
    queues.close()


def cuda_round_trip(queues: TensorQueues, inbox: Any, results: Any) -> None:
    """Decode one message whose tensor came through CUDA IPC and check its contents."""
    msg = Decoder(source=SharedTensorReceiver(queues, 0)).decode(inbox.get(timeout=30))
    t = msg["t"]
    expected = torch.arange(1 << 20, device=t.device, dtype=torch.float32)
    results.put((bool(torch.equal(t, expected)), str(t.device)))
