"""The shared tensor channel's protocol in one process: routing, buffering, validation, staleness,
abort, TTL, fallbacks and re-sending. (Real cross-process sharing: test_ipc_multiprocess.py.)"""

from __future__ import annotations

import logging
import os
import subprocess
import time

import pytest
import torch
import torch.multiprocessing as tmp
from hypothesis import given
from hypothesis import strategies as st

from mx_reference.ipc import (
    DecodeError,
    Decoder,
    Encoder,
    ProducerGone,
    ReceiverStarved,
    SharedChannelConfig,
    SharedTensorReceiver,
    SharedTensorSender,
    TensorQueues,
    normalize_request_ids,
    request_scope,
    was_received,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def channel(producers=1, consumers=1, maxsize=0, clock=None, **config):
    cfg = SharedChannelConfig(get_timeout_s=0.05, **config)
    clock = clock or Clock()
    queues = TensorQueues.local(producers, consumers, maxsize)
    senders = [SharedTensorSender(queues, p, cfg, clock) for p in range(producers)]
    receivers = [SharedTensorReceiver(queues, c, cfg, clock) for c in range(consumers)]
    return senders, receivers


def send(sender, request_id, *tensors, target=0):
    with request_scope(sender, request_id, target):
        return Encoder(sender).encode(list(tensors))


def test_out_of_band_round_trip_keeps_tensor_alive_until_acked():
    (sender,), (receiver,) = channel()
    t = torch.randn(1000)
    frames = send(sender, "r0", t, torch.ones(2))
    assert len(frames) == 1  # large tensor went through the channel, small one inline
    assert sender.pending == 1
    out = Decoder(source=receiver).decode(frames)
    assert torch.equal(out[0], t) and torch.equal(out[1], torch.ones(2))
    assert sender.pending == 1 and sender.reap() == 1 and sender.pending == 0


def test_routing_to_the_target_consumer_only():
    (sender,), receivers = channel(consumers=3)
    send(sender, "r0", torch.ones(100), target=2)
    assert [r.poll() for r in receivers] == [0, 0, 0]
    assert [len(r.buffer) for r in receivers] == [0, 0, 1]
    with pytest.raises(ValueError, match="target 3 out of range"):
        sender.set_target(3)


def test_interleaved_producers_buffering_and_stale_warning(caplog):
    (a, b), (receiver,) = channel(producers=2)
    frames = {}
    for name, sender, seq in (("B0", b, 0), ("A0", a, 0), ("B1", b, 1), ("A1", a, 1)):
        frames[name] = send(sender, name, torch.full((100,), float(seq)))
    decoder = Decoder(source=receiver)
    receiver.poll()  # all four arrived before anything is decoded
    with caplog.at_level(logging.WARNING, logger="mx_reference.ipc.requests"):
        assert decoder.decode(frames["A1"])[0][0] == 1.0
    assert len(receiver.buffer) == 2 and receiver.buffer.stale == 1  # A0 discarded as stale
    [record] = [r for r in caplog.records if "stale" in r.getMessage()]
    assert record.getMessage() == (
        f"discarding 1 stale tensors from producer {a.producer_id} (messages older than 1)"
    )
    assert decoder.decode(frames["B0"])[0][0] == 0.0
    assert decoder.decode(frames["B1"])[0][0] == 1.0
    assert len(receiver.buffer) == 0
    with pytest.raises(DecodeError, match="older than message 1"):
        decoder.decode(frames["A0"])


def test_late_arrival_of_an_older_message_is_dropped():
    (sender,), (receiver,) = channel()
    old = send(sender, "r0", torch.ones(100))
    item = receiver.queues.data[0].get_nowait()  # hold message 0 back in transit
    Decoder(source=receiver).decode(send(sender, "r1", torch.ones(100)))
    receiver.queues.data[0].put(item)
    assert receiver.poll() == 0 and receiver.buffer.late == 1 and len(receiver.buffer) == 0
    with pytest.raises(DecodeError, match="stale"):
        Decoder(source=receiver).decode(old)


@pytest.mark.parametrize("field", ["dtype", "shape", "device"])
def test_receiver_checks_dtype_shape_and_device_on_arrival(field):
    (sender,), (receiver,) = channel()
    sender.new_message()
    handle = sender.export(torch.zeros(4, 8))
    dtype, shape = torch.float32, (4, 8)
    if field == "dtype":
        dtype = torch.float64  # vLLM accepted a float32 tensor requested as float64
    elif field == "shape":
        shape = (8, 4)
    else:
        handle = {**handle, "device": "cuda:0"}
    with pytest.raises(DecodeError, match=f"{field} .* arrived, the message declares"):
        receiver.open(dtype, shape, handle)


@pytest.mark.parametrize(
    "handle, field",
    [
        ({"message": 0, "index": 0, "device": "cpu"}, "producer"),
        ({"producer": "p", "message": 0}, "pid"),
        ({"producer": "p", "pid": 1, "message": "0"}, "message"),
    ],
)
def test_malformed_handle_names_the_field(handle, field):
    _, (receiver,) = channel()
    with pytest.raises(DecodeError, match=f"field '{field}'"):
        receiver.open(torch.float32, (1,), handle)


def test_abort_single_id_is_not_a_collection_of_characters():
    (sender,), (receiver,) = channel()
    for request_id in ("r1", "r", "1", "r2", "r3"):
        send(sender, request_id, torch.ones(100), torch.ones(100))
    receiver.poll()
    assert len(receiver.buffer) == 10
    assert receiver.abort("r1") == 2  # not "r" and "1"
    assert receiver.abort(["r2", "r3"]) == 4
    assert receiver.abort({"r"}) == 2
    assert receiver.abort("unknown") == 0
    assert len(receiver.buffer) == 2 and receiver.buffer.aborted == 8


@given(st.text(max_size=8))
def test_normalize_request_ids_treats_any_str_as_one_id(request_id):
    assert normalize_request_ids(request_id) == {request_id}
    assert normalize_request_ids([request_id, request_id]) == {request_id}


@pytest.mark.parametrize("bad", [b"r1", [1, "r"], ["r", None]])
def test_normalize_request_ids_rejects_non_str(bad):
    with pytest.raises(TypeError, match="request_ids"):
        normalize_request_ids(bad)


def test_ttl_reclaims_tensors_of_a_dead_producer_and_unacked_sends():
    clock = Clock()
    (sender,), (receiver,) = channel(clock=clock, ttl_s=5.0)
    send(sender, "r0", torch.ones(100), torch.ones(100))  # its header never comes
    assert receiver.poll() == 0 and len(receiver.buffer) == 2
    clock.now = 4.0
    assert receiver.poll() == 0
    clock.now = 6.0
    assert receiver.poll() == 2 and len(receiver.buffer) == 0
    assert sender.pending == 2  # the receiver took them but the acks are not reaped yet
    (sender2,), _ = channel(clock=clock, ttl_s=5.0)  # a producer whose consumer died
    send(sender2, "r0", torch.ones(100))
    clock.now = 12.0
    assert sender2.reap() == 1 and sender2.expired == 1 and sender2.pending == 0


def test_starved_receiver_is_told_apart_from_an_inline_fallback():
    (sender,), (receiver,) = channel(maxsize=1, put_timeout_s=0.01)
    frames = send(sender, "r0", torch.ones(100), torch.full((100,), 2.0))  # second: queue full
    assert sender.fallbacks == {"queue_full": 1} and len(frames) == 2
    out = Decoder(source=receiver).decode(frames)  # the fallback decodes without waiting
    assert out[1][0] == 2.0
    lost = send(sender, "r1", torch.ones(100))
    receiver.queues.data[0].get_nowait()  # the tensor vanishes in transit
    with pytest.raises(ReceiverStarved, match="did not arrive within 0.05 s"):
        Decoder(source=receiver).decode(lost)
    assert isinstance(ReceiverStarved("x"), TimeoutError) and not isinstance(
        ReceiverStarved("x"), ValueError
    )


def test_fallbacks_are_counted_per_reason():
    (disabled,), (receiver,) = channel(enabled=False)
    frames = send(disabled, "r0", torch.ones(100))
    assert len(frames) == 2 and disabled.fallbacks == {"disabled": 1}
    assert torch.equal(Decoder(source=receiver).decode(frames)[0], torch.ones(100))
    queues = TensorQueues.local(1, 1)
    forked = SharedTensorSender(TensorQueues(queues.data, queues.acks, "fork"), 0)
    send(forked, "r0", torch.ones(100))
    assert forked.fallbacks == {"fork": 1}
    (sender,), _ = channel()
    sender.new_message()
    assert sender.export(torch.ones(100, device="meta")) is None
    assert sender.fallbacks == {"device": 1}


@pytest.mark.parametrize("policy", ["clone", "reject"])
def test_resending_a_received_tensor(policy):
    (sender,), (receiver,) = channel()
    t = Decoder(source=receiver).decode(send(sender, "r0", torch.arange(100.0)))[0]
    assert was_received(t) and was_received(t[10:]) and not was_received(torch.arange(100.0))
    (relay,), (downstream,) = channel(resend=policy)
    if policy == "reject":
        with pytest.raises(ValueError, match="clone it before sending it on"):
            send(relay, "r0", t)
        return
    out = Decoder(source=downstream).decode(send(relay, "r0", t))[0]
    assert relay.resend_clones == 1 and torch.equal(out, t)
    assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_request_scope_restores_previous_request_and_target():
    (sender,), _ = channel(consumers=2)
    with request_scope(sender, "outer", 1):
        with pytest.raises(RuntimeError), request_scope(sender, "inner", 0):
            assert (sender.request_id, sender.target) == ("inner", 0)
            raise RuntimeError
        assert (sender.request_id, sender.target) == ("outer", 1)
    assert (sender.request_id, sender.target) == (None, 0)
    with pytest.raises(TypeError, match="request_id"), request_scope(sender, ["r1"]):  # type: ignore[arg-type]
        pass


def test_file_system_strategy_names_dev_shm_segments_file_descriptor_does_not():
    """Why the channel uses file_descriptor: its segments are unlinked at once, so a crash
    cannot leave /dev/shm entries behind; file_system's named segments can."""
    prefix = f"torch_{os.getpid()}_"
    entries = lambda: [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]  # noqa: E731
    previous = tmp.get_sharing_strategy()
    try:
        tmp.set_sharing_strategy("file_system")
        t = torch.ones(1000).share_memory_()
        named = entries()
        del t
        tmp.set_sharing_strategy("file_descriptor")
        t = torch.ones(1000).share_memory_()
        assert t.is_shared() and entries() == []
        assert len(named) == 1
    finally:
        tmp.set_sharing_strategy(previous)


@pytest.mark.reliability
def test_the_ttl_withdraws_the_fds_offered_for_tensors_no_consumer_fetched():
    """A producer whose consumer died: each unfetched tensor holds an fd in the fd server
    (``multiprocessing.resource_sharer``) until its TTL, not until the producer exits."""
    clock = Clock()
    queues = TensorQueues.create(1, 1)  # process queues: their items are pickled with an fd each
    sender = SharedTensorSender(queues, 0, SharedChannelConfig(ttl_s=1.0), clock)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    try:
        send(sender, "r0", torch.ones(1000))
        before = fds()
        for i in range(20):
            send(sender, f"r{i + 1}", torch.ones(1000))
        assert fds() >= before + 20 and sender.pending == 21
        clock.now = 2.0
        assert sender.reap() == 21 and sender.expired == 21
        assert fds() < before
    finally:
        queues.close()


def _exited_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.reliability
@pytest.mark.parametrize("lifetime", ["exited", "exits_while_waited_for"])
def test_a_tensor_of_a_producer_whose_process_exits_fails_at_once(lifetime):
    """No wait of ``get_timeout_s`` (60 s here) for a tensor whose producer is gone: the
    receiver watches the producer's process while it waits (a zombie counts as exited)."""
    queues = TensorQueues.create(1, 1)
    receiver = SharedTensorReceiver(queues, 0, SharedChannelConfig(get_timeout_s=60.0))
    child = subprocess.Popen(["sleep", "0.3"]) if lifetime != "exited" else None
    pid = child.pid if child else _exited_pid()
    handle = {"producer": "p0-x", "pid": pid, "message": 0, "index": 0, "device": "cpu"}
    start = time.monotonic()
    try:
        with pytest.raises(ProducerGone, match=f"process \\(pid {pid}\\) exited"):
            receiver.open(torch.float32, (4,), handle)
        assert time.monotonic() - start < 5 and receiver.gone == {"p0-x"}
        with pytest.raises(ProducerGone):  # its later messages fail without waiting either
            receiver.open(torch.float32, (4,), {**handle, "message": 1})
    finally:
        receiver.close()
        queues.close()
        if child:
            child.wait()
