"""Producer (API server) and consumer (engine) processes of the N x M tensor IPC scenario.

Both regenerate the same tensors from ``(producer, seq)``, so a consumer checks every tensor
bit-exact without the producer shipping a reference copy. Functions are module-level so ``spawn``
children can import them.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as tmp

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

SIZES = (16, 300, 16_384, 262_144)  # elements: inline, and three out-of-band sizes
DTYPES = (torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float16, torch.bool)
DONE = "done"


def make_tensors(producer: int, seq: int) -> list[torch.Tensor]:
    """The tensors of message ``seq`` of ``producer``: 1-4 tensors, mixed sizes and dtypes."""
    g = torch.Generator().manual_seed(producer * 100_003 + seq)
    out = []
    for i in range((producer + seq) % 4 + 1):
        numel, dtype = (
            SIZES[(producer + seq + i) % len(SIZES)],
            DTYPES[(producer * 7 + seq + i) % len(DTYPES)],
        )
        raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
        out.append((raw % 2 if dtype == torch.bool else raw).view(dtype))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    )


@dataclass
class Plan:
    """What every producer does: ``messages`` messages to random consumers, seeded."""

    messages: int
    seed: int
    disabled_producers: tuple[int, ...] = ()  # these send inline (counted fallbacks)
    killed_producers: tuple[int, ...] = ()  # these SIGKILL themselves after a burst:
    killed_after: int = 0  # this many messages, sent without pauses
    max_sleep_s: float = 0.002
    drain_timeout_s: float = 20.0

    def survivors(self, num_producers: int) -> int:
        return num_producers - len(self.killed_producers)


def producer_main(
    queues: TensorQueues,
    headers: list[Any],
    results: Any,
    slot: int,
    plan: Plan,
    config: SharedChannelConfig,
) -> None:
    setup_sharing(config)
    if slot in plan.disabled_producers:
        config = SharedChannelConfig(enabled=False)
    sender = SharedTensorSender(queues, slot, config)
    encoder = Encoder(sender)
    rng = random.Random(plan.seed * 1000 + slot)
    killed = slot in plan.killed_producers
    for seq in range(plan.killed_after if killed else plan.messages):
        target = rng.randrange(len(headers))
        msg = {"producer": slot, "seq": seq, "target": target, "tensors": make_tensors(slot, seq)}
        with request_scope(sender, f"p{slot}-{seq}", target):
            frames = encoder.encode(msg)
        headers[target].put([bytes(f) for f in frames])
        if not killed:
            time.sleep(rng.random() * plan.max_sleep_s)
    if killed:
        _die(queues, headers, results, slot, sender.sent)
    for h in headers:
        h.put(DONE)
    deadline = time.monotonic() + plan.drain_timeout_s
    while sender.pending and time.monotonic() < deadline:  # keep tensors alive until taken
        sender.reap()
        time.sleep(0.01)
    results.put(
        (
            "producer",
            slot,
            {"sent": sender.sent, "pending": sender.pending, "fallbacks": dict(sender.fallbacks)},
        )
    )
    queues.close()


def _die(queues: TensorQueues, headers: list[Any], results: Any, slot: int, sent: int) -> None:
    """Flush every queue this producer wrote to, report, and SIGKILL this process: its tensors
    still in the pipes can no longer be fetched (its fd server dies with it)."""
    for q in (*queues.data, *headers):
        q.close()
        q.join_thread()
    results.put(("killed", slot, {"sent": sent, "at": time.monotonic()}))
    results.close()
    results.join_thread()
    os.kill(os.getpid(), signal.SIGKILL)


def consumer_main(
    queues: TensorQueues,
    headers: list[Any],
    results: Any,
    index: int,
    num_producers: int,
    config: SharedChannelConfig,
) -> None:
    """Decode until ``num_producers`` said done. A message whose tensors will never come is
    recorded in ``failed`` (with the time) and the consumer goes on with the next one."""
    setup_sharing(config)
    receiver = SharedTensorReceiver(queues, index, config)
    decoder = Decoder(source=receiver)
    seen: list[
        tuple[int, int, int, int, int, bool]
    ] = []  # producer, seq, target, tensors, bytes, ok
    delivered_at: list[float] = []  # time.monotonic() of each entry of seen
    failed: list[tuple[str, float]] = []  # error type, time.monotonic()
    done = 0
    while done < num_producers:
        try:
            frames = headers[index].get(timeout=config.get_timeout_s)
        except queue.Empty:
            break
        if frames == DONE:
            done += 1
            continue
        try:
            msg = decoder.decode(frames)
        except ReceiverStarved as exc:
            failed.append((type(exc).__name__, time.monotonic()))
            continue
        expected = make_tensors(msg["producer"], msg["seq"])
        got = msg["tensors"]
        ok = len(got) == len(expected) and all(
            same_bits(a, b) for a, b in zip(got, expected, strict=True)
        )
        nbytes = sum(t.numel() * t.element_size() for t in got)
        seen.append((msg["producer"], msg["seq"], msg["target"], len(got), nbytes, ok))
        delivered_at.append(time.monotonic())
        del msg, got
    stats = {
        "done": done,
        "received": receiver.received,
        "buffered": len(receiver.buffer),
        "expired": receiver.buffer.expired,
        "lost": receiver.lost,
        "gone": len(receiver.gone),
    }
    receiver.close()
    report = {"seen": seen, "delivered_at": delivered_at, "failed": failed, **stats}
    results.put(("consumer", index, report))
    queues.close()


def run_processes(
    num_producers: int,
    num_consumers: int,
    plan: Plan,
    config: SharedChannelConfig,
    timeout_s: float,
) -> tuple[dict[tuple[str, int], dict[str, Any]], float]:
    """Run ``producer_main`` and ``consumer_main`` processes over one set of queues; returns
    each process's report keyed ``(role, index)`` (``"killed"`` for a producer of
    ``plan.killed_producers``) and the wall seconds. ``TimeoutError`` names what went missing."""
    ctx = tmp.get_context("spawn")
    queues = TensorQueues.create(num_producers, num_consumers, ctx)
    headers = [ctx.Queue() for _ in range(num_consumers)]
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=producer_main, args=(queues, headers, results, p, plan, config), daemon=True
        )
        for p in range(num_producers)
    ] + [
        ctx.Process(
            target=consumer_main,
            args=(queues, headers, results, c, plan.survivors(num_producers), config),
            daemon=True,
        )
        for c in range(num_consumers)
    ]
    start = time.perf_counter()
    reports: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        for p in procs:
            p.start()
        while len(reports) < len(procs):
            role, index, report = results.get(timeout=timeout_s)
            reports[(role, index)] = report
    except queue.Empty:
        raise TimeoutError(f"only {len(reports)} of {len(procs)} processes reported") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (*headers, results):
            q.close()
            q.cancel_join_thread()
        queues.close()
    return reports, time.perf_counter() - start


def echo_consumer(
    queues: TensorQueues, inbox: Any, outbox: Any, config: SharedChannelConfig
) -> None:
    """Benchmark consumer: decode each message and reply with how many tensors it held."""
    setup_sharing(config)
    decoder = Decoder(source=SharedTensorReceiver(queues, 0, config))
    while (frames := inbox.get()) is not None:
        outbox.put(len(decoder.decode(frames)))
    queues.close()
