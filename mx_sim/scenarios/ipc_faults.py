"""IPC faults, each measured: a producer SIGKILLed mid-stream beside a healthy one, and a
producer streaming on after its consumer was SIGKILLed, under a 1024-fd limit.

``python -m mx_sim.scenarios.ipc_faults CASE [--seconds S]`` runs one case and prints its
result as one JSON line; the reliability tests run it that way inside a private ``/dev/shm``
(:mod:`mx_sim.isolation`), so the shared-memory counts are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import time
from typing import Any

import torch
import torch.multiprocessing as tmp

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
from mx_sim.ipc_workers import Plan, run_processes
from mx_sim.report import ScenarioResult

STREAMED_NUMEL = 16_384  # 64 KiB a tensor: out of band, one fd each until fetched


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _shm_entries() -> int:
    return len(os.listdir("/dev/shm"))


def run_producer_death(
    messages: int = 300, burst: int = 40, get_timeout_s: float = 5.0, ttl_s: float = 10.0
) -> ScenarioResult:
    """Producer 0 sends ``burst`` messages at once and SIGKILLs itself; producer 1 streams
    ``messages`` to the same consumer. Its tensors still in the pipe die with producer 0's fd
    server. Passes when the dead producer is noticed once, each of its messages is delivered or
    fails fast (well under one ``get_timeout_s``), and every healthy message arrives bit-exact
    with none of its tensors reclaimed."""
    plan = Plan(messages=messages, seed=3, killed_producers=(0,), killed_after=burst)
    config = SharedChannelConfig(get_timeout_s=get_timeout_s, ttl_s=ttl_s)
    shm_before = _shm_entries()
    try:
        reports, seconds = run_processes(2, 1, plan, config, timeout_s=60.0)
    except TimeoutError as exc:
        return ScenarioResult("ipc_producer_death", False, str(exc))
    consumer, killed, healthy = (
        reports[("consumer", 0)],
        reports[("killed", 0)],
        reports[("producer", 1)],
    )
    seen = consumer["seen"]
    delivered = {seq for producer, seq, *_ in seen if producer == 1}
    healthy_at = [
        at
        for (producer, *_), at in zip(seen, consumer["delivered_at"], strict=True)
        if producer == 1
    ]
    corrupted = [seq for producer, seq, *_, ok in seen if not ok]
    dead_delivered = sum(producer == 0 for producer, *_ in seen)
    failures = [at for kind, at in consumer["failed"] if kind == "ProducerGone"]
    time_to_error = max(failures) - killed["at"] if failures else 0.0
    healthy_bytes = sum(nbytes for producer, _, _, _, nbytes, _ in seen if producer == 1)
    figures = {
        "healthy_delivered": len(delivered),
        "healthy_expected": messages,
        "healthy_after_kill": sum(at > killed["at"] for at in healthy_at),
        "healthy_messages_per_s": (len(healthy_at) - 1) / (max(healthy_at) - min(healthy_at))
        if len(healthy_at) > 1
        else 0.0,
        "dead_delivered": dead_delivered,
        "dead_failed": len(failures),
        "other_failures": len(consumer["failed"]) - len(failures),
        "time_to_error_s": time_to_error,
        "get_timeout_s": get_timeout_s,
        "detections": consumer["gone"],
        "healthy_expired": consumer["expired"],
        "healthy_unacked": healthy["pending"],
        "shm_entries_added": _shm_entries() - shm_before,
    }
    problems = [
        *(["healthy messages missing"] if len(delivered) != messages else []),
        *([f"corrupted: {corrupted[:5]}"] if corrupted else []),
        *(["no message of the dead producer was in flight"] if not failures else []),
        *(
            [f"{dead_delivered} + {len(failures)} != {burst} messages of the dead producer"]
            if dead_delivered + len(failures) != burst
            else []
        ),
        *([f"time to error {time_to_error:.2f} s"] if time_to_error >= get_timeout_s / 2 else []),
        *([f"{consumer['gone']} detections"] if consumer["gone"] != 1 else []),
        *(["healthy tensors reclaimed"] if consumer["expired"] or healthy["pending"] else []),
        *([f"{consumer['failed']} other failures"] if figures["other_failures"] else []),
    ]
    return ScenarioResult(
        "ipc_producer_death",
        passed=not problems,
        detail="; ".join(problems)
        or f"{len(failures)} messages of the dead producer failed {time_to_error:.3f} s after "
        f"the kill (timeout {get_timeout_s} s); healthy {len(delivered)}/{messages}, "
        f"{figures['healthy_after_kill']} after the kill",
        bytes_moved=healthy_bytes,
        seconds=seconds,
        details=figures,
    )


def _idle_consumer(
    queues: TensorQueues, headers: Any, results: Any, take: int, config: SharedChannelConfig
) -> None:
    """Decode ``take`` messages, report this process's pid (or the error that stopped it),
    then wait to be SIGKILLed."""
    setup_sharing(config)
    decoder = Decoder(source=SharedTensorReceiver(queues, 0, config))
    try:
        for _ in range(take):
            decoder.decode(headers.get(timeout=30))
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")
        return
    results.put(os.getpid())
    time.sleep(600)


def _streaming_producer(
    queues: TensorQueues,
    headers: Any,
    results: Any,
    consumer_killed: Any,
    take: int,
    seconds: float,
    min_messages: int,
    nofile: int,
    config: SharedChannelConfig,
) -> None:
    """Send the ``take`` messages the consumer decodes, wait until it was killed, then stream
    one 64 KiB tensor a message for ``seconds``, and on until ``min_messages`` were sent (a
    loaded machine streams slower), under an fd limit of ``nofile``, sampling this process's
    fd count; report the samples and the first error."""
    setup_sharing(config)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    sender = SharedTensorSender(queues, 0, config)
    encoder = Encoder(sender)

    def send(seq: int) -> None:
        with request_scope(sender, f"r{seq}", 0):
            frames = encoder.encode({"seq": seq, "t": torch.full((STREAMED_NUMEL,), float(seq))})
        headers.put([bytes(f) for f in frames])

    # nothing is sent (and so nothing reaped at the TTL) until the consumer has what it
    # decodes: a consumer slow to start on a loaded machine must not find its tensors
    # withdrawn, nor this producer gone before it decoded them
    for seq in range(take):
        send(seq)
    consumer_killed.wait(timeout=120)
    fds, error, seq = [_fd_count()], "", take
    start = next_sample = time.monotonic()
    while (now := time.monotonic()) - start < seconds or seq - take < min_messages:
        try:
            send(seq)
        except OSError as exc:  # EMFILE: out of fds
            error = f"{type(exc).__name__}: {exc}"
            break
        seq += 1
        if now >= next_sample:
            fds.append(_fd_count())
            next_sample = now + 0.25
        time.sleep(0.002)
    report = {
        "seconds": time.monotonic() - start,
        "messages": seq - take,
        "fds": fds,
        "error": error,
        "expired": sender.expired,
        "pending": sender.pending,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    results.put(report)
    headers.cancel_join_thread()  # its consumer is dead: exit without flushing to it
    queues.close()


def run_dead_consumer(
    seconds: float = 6.0, ttl_s: float = 0.5, nofile: int = 1024
) -> ScenarioResult:
    """A consumer decodes a few messages and is SIGKILLed; its producer streams on for
    ``seconds`` (and at least ``nofile`` messages: unfetched, each would hold two fds, its
    storage's and the one offered for it) with ``RLIMIT_NOFILE`` at ``nofile``.
    Passes when the producer never runs out of fds and its fd count stays bounded (the TTL
    withdraws the fds of never-fetched tensors)."""
    config = SharedChannelConfig(ttl_s=ttl_s)
    ctx = tmp.get_context("spawn")
    queues = TensorQueues.create(1, 1, ctx)
    # a queue of its own for each child: the consumer is SIGKILLed right after its put, and a
    # process killed inside a put holds the queue's shared write lock for good
    headers, from_consumer, from_producer = ctx.Queue(), ctx.Queue(), ctx.Queue()
    consumer_killed = ctx.Event()
    take = 5
    consumer = ctx.Process(
        target=_idle_consumer, args=(queues, headers, from_consumer, take, config), daemon=True
    )
    stream = (take, seconds, nofile, nofile, config)
    producer = ctx.Process(
        target=_streaming_producer,
        args=(queues, headers, from_producer, consumer_killed, *stream),
        daemon=True,
    )
    shm_before = _shm_entries()
    start = time.perf_counter()
    try:
        consumer.start()
        producer.start()
        pid = from_consumer.get(timeout=60)
        if isinstance(pid, str):
            return ScenarioResult("ipc_dead_consumer", False, f"the consumer failed: {pid}")
        os.kill(pid, signal.SIGKILL)
        consumer_killed.set()
        report = from_producer.get(timeout=seconds + 120)
    except queue.Empty:
        return ScenarioResult("ipc_dead_consumer", False, "a process did not report")
    finally:
        for p in (consumer, producer):
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (headers, from_consumer, from_producer):
            q.close()
            q.cancel_join_thread()
        queues.close()
    fds = report["fds"]
    bound = nofile // 2
    figures = {
        "seconds": report["seconds"],
        "messages": report["messages"],
        "fds_start": fds[0],
        "fds_max": max(fds),
        "fds_end": fds[-1],
        "fd_limit": nofile,
        "expired": report["expired"],
        "producer_max_rss_mb": report["max_rss_mb"],
        "shm_entries_added": _shm_entries() - shm_before,
    }
    problems = [
        *([report["error"]] if report["error"] else []),
        *([f"fds reached {max(fds)} (bound {bound})"] if max(fds) > bound else []),
        *(["nothing expired: the consumer never looked dead"] if not report["expired"] else []),
    ]
    return ScenarioResult(
        "ipc_dead_consumer",
        passed=not problems,
        detail="; ".join(problems)
        or f"{report['messages']} messages in {report['seconds']:.0f} s after the consumer died: "
        f"fds {fds[0]} -> max {max(fds)} under a limit of {nofile}",
        bytes_moved=report["messages"] * STREAMED_NUMEL * 4,
        seconds=time.perf_counter() - start,
        details=figures,
    )


def run(quick: bool) -> list[ScenarioResult]:
    return [run_producer_death(), run_dead_consumer(seconds=3.0 if quick else 6.0)]


CASES = {"producer_death": run_producer_death, "dead_consumer": run_dead_consumer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--seconds", type=float, help="dead_consumer: how long the stream runs")
    parser.add_argument("--nofile", type=int, help="dead_consumer: the producer's fd limit")
    parser.add_argument("--ttl", type=float, help="dead_consumer: the channel's ttl_s")
    args = parser.parse_args()
    given = {"seconds": args.seconds, "nofile": args.nofile, "ttl_s": args.ttl}
    kwargs = {k: v for k, v in given.items() if v is not None}
    print(json.dumps(CASES[args.case](**kwargs).to_json()))


if __name__ == "__main__":
    main()
