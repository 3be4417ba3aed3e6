"""Producer (API server) and consumer (engine) processes of the N x M tensor IPC scenario.

Both regenerate the same tensors from ``(producer, seq)``, so a consumer checks every tensor
bit-exact without the producer shipping a reference copy. Functions are module-level so ``spawn``
children can import them.
"""

from __future__ import annotations

import queue
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from mx_reference.ipc import (
    Decoder,
    Encoder,
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
    max_sleep_s: float = 0.002
    drain_timeout_s: float = 20.0


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
    for seq in range(plan.messages):
        target = rng.randrange(len(headers))
        msg = {"producer": slot, "seq": seq, "target": target, "tensors": make_tensors(slot, seq)}
        with request_scope(sender, f"p{slot}-{seq}", target):
            frames = encoder.encode(msg)
        headers[target].put([bytes(f) for f in frames])
        time.sleep(rng.random() * plan.max_sleep_s)
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


def consumer_main(
    queues: TensorQueues,
    headers: list[Any],
    results: Any,
    index: int,
    num_producers: int,
    config: SharedChannelConfig,
) -> None:
    setup_sharing(config)
    receiver = SharedTensorReceiver(queues, index, config)
    decoder = Decoder(source=receiver)
    seen: list[
        tuple[int, int, int, int, int, bool]
    ] = []  # producer, seq, target, tensors, bytes, ok
    done = 0
    while done < num_producers:
        try:
            frames = headers[index].get(timeout=config.get_timeout_s)
        except queue.Empty:
            break
        if frames == DONE:
            done += 1
            continue
        msg = decoder.decode(frames)
        expected = make_tensors(msg["producer"], msg["seq"])
        got = msg["tensors"]
        ok = len(got) == len(expected) and all(
            same_bits(a, b) for a, b in zip(got, expected, strict=True)
        )
        nbytes = sum(t.numel() * t.element_size() for t in got)
        seen.append((msg["producer"], msg["seq"], msg["target"], len(got), nbytes, ok))
        del msg, got
    stats = {
        "done": done,
        "received": receiver.received,
        "buffered": len(receiver.buffer),
        "lost": receiver.lost,
    }
    results.put(("consumer", index, {"seen": seen, **stats}))
    queues.close()


def echo_consumer(
    queues: TensorQueues, inbox: Any, outbox: Any, config: SharedChannelConfig
) -> None:
    """Benchmark consumer: decode each message and reply with how many tensors it held."""
    setup_sharing(config)
    decoder = Decoder(source=SharedTensorReceiver(queues, 0, config))
    while (frames := inbox.get()) is not None:
        outbox.put(len(decoder.decode(frames)))
    queues.close()
