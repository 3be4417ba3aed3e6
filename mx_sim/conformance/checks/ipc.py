"""Conformance checks: ipc.*

The adapter's codec, shared channel and request bookkeeping, driven through
``make_codec`` / ``make_channel`` / ``make_request_tracker`` and judged on bytes: what comes out
must be bit-identical to what went in (compared as raw bytes, so NaNs, -0.0 and bf16 count),
every malformed frame list must raise :class:`~mx_reference.ipc.DecodeError`, and an abort must
free exactly the requests it names.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import msgspec
import numpy as np
import torch

from mx_reference import adapter as caps
from mx_reference.ipc import DecodeError, request_scope
from mx_reference.ipc.codec import EXT_TENSOR, FRAME, HANDLE, INLINE, TORCH_DTYPES
from mx_sim.conformance.catalog import check

DTYPES = sorted(TORCH_DTYPES.values(), key=str)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes viewed as ``dtype``: every bit pattern, NaNs included."""
    numel = int(np.prod(shape))
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (max(numel, 1) * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)[:numel].reshape(shape)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in logical order, shape (nbytes,), for any dtype and strides."""
    same = _SAME_SIZE_INT.get(t.element_size())
    t = t.contiguous() if same is None else t.view(same).contiguous()
    return t.reshape(-1).view(torch.uint8)


def _diff(sent: Any, got: Any, path: str) -> str | None:
    """Where ``got`` is not a bit-exact copy of ``sent`` (tuples may come back as lists)."""
    if isinstance(sent, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path}: a tensor came back as {type(got).__name__}"
        if (got.dtype, tuple(got.shape)) != (sent.dtype, tuple(sent.shape)):
            return (
                f"{path}: sent {sent.dtype} {tuple(sent.shape)}, got {got.dtype} {tuple(got.shape)}"
            )
        if sent.numel() and not torch.equal(_raw(got.cpu()), _raw(sent.cpu())):
            return f"{path}: {sent.dtype} {tuple(sent.shape)} bytes differ"
        return None
    if isinstance(sent, np.ndarray):
        same = isinstance(got, np.ndarray) and got.dtype == sent.dtype and got.shape == sent.shape
        if not same or got.tobytes() != sent.tobytes():
            return f"{path}: ndarray {sent.dtype} {sent.shape} did not come back bit-exact"
        return None
    if isinstance(sent, dict):
        if not isinstance(got, dict) or list(got) != list(sent):
            return f"{path}: dict keys {list(sent)} came back as {got!r:.80}"
        return next((d for k in sent if (d := _diff(sent[k], got[k], f"{path}.{k}"))), None)
    if isinstance(sent, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(sent):
            return f"{path}: a sequence of {len(sent)} came back as {got!r:.80}"
        pairs = enumerate(zip(sent, got, strict=True))
        return next((d for i, (s, g) in pairs if (d := _diff(s, g, f"{path}[{i}]"))), None)
    return None if got == sent else f"{path}: sent {sent!r:.40}, got {got!r:.40}"


def _expect_round_trip(adapter, message: Any, channel: Any = None) -> list:
    encoder, decoder = adapter.make_codec(channel)
    frames = encoder.encode(message)
    error = _diff(message, decoder.decode(frames), "message")
    if error:
        raise AssertionError(f"codec round trip is not bit-exact at {error}")
    return frames


def _dtype_message(dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """One of each shape class for ``dtype``: 0-d, small (inline), large (a buffer frame),
    empty, and non-contiguous."""
    return {
        "scalar": _random(dtype, (), seed),
        "small": _random(dtype, (3,), seed + 1),
        "large": _random(dtype, (40, 9), seed + 2),
        "empty": _random(dtype, (0, 3), seed + 3),
        "transposed": _random(dtype, (9, 40), seed + 4).t(),
    }


@check("ipc.codec_round_trip")
def codec_round_trip(adapter) -> None:
    """The codec round-trips every dtype (bf16, fp8...), empty and non-contiguous tensors, nested."""
    by_dtype = {str(d).removeprefix("torch."): _dtype_message(d, i) for i, d in enumerate(DTYPES)}
    nested = {
        "request": "req-7",
        "tokens": [1, 2, 3],
        "mm": [({"pixels": _random(torch.bfloat16, (2, 3, 8, 8), 99)}, None), 4.5],
        "array": np.arange(300, dtype=np.float16).reshape(30, 10),
        "tuple": (torch.arange(5), "text", {"deep": [[torch.ones(2, 2, dtype=torch.int8)]]}),
    }
    _expect_round_trip(adapter, {"by_dtype": by_dtype, "nested": nested})


def _ext(dtype: str, shape: list[int], kind: int, data: Any, code: int = EXT_TENSOR) -> bytes:
    payload = msgspec.msgpack.encode((dtype, shape, kind, data))
    return msgspec.msgpack.encode({"t": msgspec.msgpack.Ext(code, payload)})


def _malformed(adapter) -> dict[str, Any]:
    """Frame lists no decoder may accept, built from the adapter's own frames and by hand."""
    encoder, _ = adapter.make_codec()
    good = encoder.encode({"t": torch.arange(100, dtype=torch.float32)})
    header, buffer = bytes(good[0]), bytes(good[1])
    return {
        "frames that are one bytes object": header,
        "no frames": [],
        "a header that is not msgpack": [b"\xc1\xc1"],
        "a truncated header": [header[:-3], buffer],
        "a missing buffer frame": [header],
        "an extra buffer frame": [header, buffer, b"\x00" * 8],
        "a truncated buffer frame": [header, buffer[:-4]],
        "a frame that is not a buffer": [header, 42],
        "an unknown dtype": [_ext("float128", [4], INLINE, b"\x00" * 64)],
        "an unknown extension code": [_ext("float32", [1], INLINE, b"\x00" * 4, code=77)],
        "a frame index out of range": [_ext("float32", [100], FRAME, 5), buffer],
        "inline data of the wrong size": [_ext("float32", [4], INLINE, b"\x00" * 3)],
        "a kind that does not match its data": [_ext("float32", [1], INLINE, 0)],
        "a hostile shape": [_ext("float32", [2**62, 2**62], INLINE, b"")],
        "a channel handle on an inline decoder": [_ext("float32", [4], HANDLE, {"x": 1})],
    }


@check("ipc.malformed_frames")
def malformed_frames(adapter) -> None:
    """Every malformed frame list raises DecodeError, and nothing else."""
    for what, frames in _malformed(adapter).items():
        _, decoder = adapter.make_codec()
        _expect_decode_error(decoder, frames, f"decoding {what}")


def _expect_decode_error(decoder: Any, frames: list, what: str) -> None:
    try:
        decoder.decode(frames)
    except DecodeError:
        return
    except Exception as exc:
        raise AssertionError(
            f"{what} raised {type(exc).__name__} ({exc}), not DecodeError"
        ) from exc
    raise AssertionError(f"{what} succeeded; it must raise DecodeError")


def _large(seed: int) -> dict[str, torch.Tensor]:
    """Tensors over the inline threshold, so a shared channel takes each out of band."""
    return {
        "f32": _random(torch.float32, (64, 8), seed),
        "bf16": _random(torch.bfloat16, (32, 16), seed + 1),
        "i64": torch.arange(200),
        "transposed": _random(torch.float16, (16, 64), seed + 2).t(),
    }


@check("ipc.shared_round_trip", requires=(caps.SHARED_IPC,))
def shared_round_trip(adapter) -> None:
    """The shared channel carries large tensors by handle, zero-copy and bit-exact."""
    channel = adapter.make_channel("shared")
    sink, _ = channel
    message: dict[str, Any] = {"large": _large(0), "small": torch.ones(3), "text": "hello"}
    frames = _expect_round_trip(adapter, message, channel)
    sent = len(message["large"])
    if len(frames) != 1 or sink.sent != sent:
        raise AssertionError(
            f"{len(frames) - 1} buffer frames and {sink.sent} shared tensors for {sent} large "
            f"tensors: the shared channel must carry each by handle (fallbacks {dict(sink.fallbacks)})"
        )
    encoder, decoder = adapter.make_codec(channel)
    original = torch.zeros(100)
    received = decoder.decode(encoder.encode(original))
    original.fill_(7.0)  # shared memory: a write after sending is seen by the receiver
    if not torch.equal(received.cpu(), original):
        raise AssertionError("the received tensor is a copy: a write to the sent one is not seen")


@check("ipc.several_producers", requires=(caps.SHARED_IPC,))
def several_producers(adapter) -> None:
    """Two producers on one consumer, their messages decoded in another order than sent, then
    a restarted incarnation of the first: every message decodes bit-exact, and the
    restarted producer's first message is not taken for a stale one."""
    channel = adapter.make_channel("shared", producers=2, get_timeout_s=0.5)
    _, source = channel
    producers = {"a": channel[0], "b": adapter.attach_producer(channel, 1)}
    sent = []
    for i, who in enumerate("aabab"):  # a: messages 0, 1, 2; b: messages 0, 1
        encoder, _ = adapter.make_codec((producers[who], source))
        message = {"from": who, "t": _random(torch.float32, (256,), i)}
        sent.append((message, encoder.encode(message)))
    producers["a"] = adapter.attach_producer(channel, 0)  # a restarts: its ids start again
    encoder, decoder = adapter.make_codec((producers["a"], source))
    restarted = {"from": "a restarted", "t": _random(torch.float32, (256,), 9)}
    sent.append((restarted, encoder.encode(restarted)))
    for index in (2, 4, 0, 1, 3, 5):
        message, frames = sent[index]
        try:
            error = _diff(message, decoder.decode(frames), f"message {index} of {message['from']}")
        except Exception as exc:
            error = f"message {index} of {message['from']}: {type(exc).__name__}: {exc}"
        if error:
            raise AssertionError(f"two producers and a restarted one: {error}")


def _retag(frames: list, field: int, value: Any) -> list:
    """``frames`` of a one-tensor message with payload field ``field`` (0 dtype, 1 shape) set."""
    code, payload = msgspec.msgpack.decode(frames[0], ext_hook=lambda c, d: (c, bytes(d)))
    fields = list(msgspec.msgpack.decode(payload))
    fields[field] = value
    ext = msgspec.msgpack.Ext(code, msgspec.msgpack.encode(fields))
    return [msgspec.msgpack.encode(ext), *frames[1:]]


@check("ipc.shared_checks_dtype_shape", requires=(caps.SHARED_IPC,))
def shared_checks_dtype_shape(adapter) -> None:
    """A shared tensor whose message declares another dtype or shape is rejected with DecodeError."""
    for what, field, value in (("dtype int32", 0, "int32"), ("shape (32, 2)", 1, [32, 2])):
        channel = adapter.make_channel("shared")
        encoder, decoder = adapter.make_codec(channel)
        frames = _retag(encoder.encode(torch.ones(64)), field, value)
        _expect_decode_error(decoder, frames, f"decoding a float32 (64,) tensor declared as {what}")


def _expect_frees(tracker: Any, ids: Any, expected: int, left: int) -> None:
    freed = tracker.abort(ids)
    if freed != expected or len(tracker) != left:
        raise AssertionError(
            f"abort({ids!r}) freed {freed} tensors ({len(tracker)} left); expected {expected} "
            f"({left} left): a str is one request id, never a collection of characters"
        )


@check("ipc.abort_request_ids")
def abort_request_ids(adapter) -> None:
    """abort() takes one str id or a collection, and frees exactly those requests' tensors."""
    tracker = adapter.make_request_tracker()
    # One-character ids are the characters of "req-1": iterating the str would free them.
    ids = ["req-1", "req-1", "r", "e", "q", "-", "1", "req-2", "req-3"]
    for index, request_id in enumerate(ids):
        tracker.add(("p0", 0, index), torch.full((2,), float(index)), request_id)
    _expect_frees(tracker, "req-1", 2, 7)
    _expect_frees(tracker, ["r", "e"], 2, 5)
    _expect_frees(tracker, ("q",), 1, 4)
    _expect_frees(tracker, {"req-2", "unknown"}, 1, 3)
    _expect_frees(tracker, "-", 1, 2)
    _expect_frees(tracker, iter(["1", "req-3"]), 2, 0)


@check("ipc.abort_releases_storage")
def abort_releases_storage(adapter) -> None:
    """abort() releases the aborted tensors' memory at once (their last reference is gone,
    judged by weak references), not at the TTL, and keeps the other requests' tensors."""
    tracker = adapter.make_request_tracker(ttl_s=3600.0)
    refs = {}
    for index, request_id in enumerate(["req-1", "req-1", "req-2"]):
        t = torch.full((1024,), float(index))
        refs[index] = (request_id, weakref.ref(t))
        tracker.add(("p0", 0, index), t, request_id)
        del t
    freed = tracker.abort("req-1")
    gc.collect()
    alive = [i for i, (_, ref) in refs.items() if ref() is not None]
    if alive != [2]:
        held = [i for i in alive if refs[i][0] == "req-1"]
        raise AssertionError(
            f"abort('req-1') returned {freed}, yet tensors {held} of req-1 are still alive "
            f"(memory held until the TTL)"
            if held
            else f"abort('req-1') also released tensors of req-2: alive {alive}"
        )


@check("ipc.shared_abort", requires=(caps.SHARED_IPC,))
def shared_abort(adapter) -> None:
    """Aborting one request frees its tensors waiting in the shared channel, and only those."""
    channel = adapter.make_channel("shared", get_timeout_s=0.2)
    sink, source = channel
    encoder, decoder = adapter.make_codec(channel)
    with request_scope(sink, "req-1"):
        encoder.encode([torch.zeros(100), torch.ones(100)])
    with request_scope(sink, "r"):  # "r" is a character of "req-1"
        keep = torch.arange(100.0)
        frames = encoder.encode(keep)
    source.poll()  # all three arrive before their messages are decoded
    freed = source.abort("req-1")
    if freed != 2:
        raise AssertionError(f"abort('req-1') freed {freed} buffered tensors, expected 2")
    try:
        got = decoder.decode(frames)
    except Exception as exc:
        raise AssertionError(
            f"request 'r' no longer decodes after abort('req-1'): {type(exc).__name__}: {exc}"
        ) from exc
    if not torch.equal(got.cpu(), keep):
        raise AssertionError("request 'r' decodes to other bytes after abort('req-1')")


@check("ipc.fallbacks_counted", requires=(caps.SHARED_IPC,))
def fallbacks_counted(adapter) -> None:
    """A disabled shared channel sends every tensor inline and counts each fallback."""
    channel = adapter.make_channel("shared", enabled=False)
    sink, _ = channel
    message = _large(5)
    frames = _expect_round_trip(adapter, message, channel)
    n = len(message)
    if len(frames) != 1 + n or sink.fallbacks.get("disabled") != n or sink.sent:
        raise AssertionError(
            f"{n} tensors on a disabled channel: {len(frames) - 1} buffer frames, "
            f"{sink.sent} shared, fallbacks {dict(sink.fallbacks)}; expected {n} frames, 0 "
            f"shared, {{'disabled': {n}}}"
        )
