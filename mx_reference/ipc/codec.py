"""msgpack codec for nested messages carrying tensors and arrays, PEP 574 style.

``Encoder.encode(obj)`` returns a list of frames: ``frames[0]`` is the msgpack header, ``frames[1:]``
are out-of-band buffers. Each tensor or ndarray in the message becomes a msgpack extension whose
payload is ``[dtype, shape, kind, data]``:

- ``kind == INLINE``: ``data`` is the raw bytes (tensors with ``nbytes < inline_threshold``, 0-d
  arrays);
- ``kind == FRAME``: ``data`` is an index into ``frames[1:]``;
- ``kind == HANDLE``: ``data`` is an opaque msgpack map produced by a :class:`TensorSink` (for
  example the shared-memory channel); the matching :class:`TensorSource` turns it back into a
  tensor.

The codec knows how bytes are laid out, not how they travel: a sink decides whether a tensor goes
out-of-band through it (it returns a handle) or as a frame (it returns ``None``). The decoder never
unpickles; every malformed input raises :class:`DecodeError` (a ``ValueError``) before anything
large is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
import numpy as np
import torch

EXT_TENSOR = 1
EXT_NDARRAY = 2

INLINE, FRAME, HANDLE = 0, 1, 2

DEFAULT_INLINE_THRESHOLD = 256  # bytes; strictly smaller tensors travel inline (as in vLLM)
MAX_NDIM = 64
MAX_DIM = 2**48  # no real tensor dimension comes close; bounds size arithmetic on hostile input

# Every torch dtype whose bytes can be viewed as uint8; quantized dtypes carry scales and cannot.
TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in vars(torch).values()
    if isinstance(d, torch.dtype) and not str(d).startswith(("torch.qint", "torch.quint"))
}

Frame = bytes | bytearray | memoryview

_Payload = tuple[str, tuple[int, ...], int, bytes | int | dict[str, Any]]


class DecodeError(ValueError):
    """The one exception the decoder raises for malformed input: bad msgpack, truncated frames,
    wrong buffer counts, unknown dtypes or extension codes, sizes that do not match the data, a
    channel handle with no channel to open it, or containers nested deeper than
    :data:`MAX_DEPTH`."""


# Containers a header may nest. msgspec decodes recursively and raises RecursionError (not a
# DecodeError) near 1000 levels, so deeper input is refused before it reaches msgspec.
MAX_DEPTH = 64
_FIXED = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4,
          0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}  # fmt: skip
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
          0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}  # (length bytes, ext type byte)  # fmt: skip
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # (length bytes, items)


def check_depth(data: Frame, limit: int = MAX_DEPTH) -> None:
    """``DecodeError`` when the msgpack value in ``data`` nests containers deeper than
    ``limit``. Reads only type and length bytes (strings, binaries and extensions are skipped
    whole); anything malformed is left for the decoder to report."""
    buf, pos = bytes(data), 0
    pending = [1]  # items still to read at each open level; the root level holds one value
    while pending and pos < len(buf):
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        t = buf[pos]
        pos += 1
        count = 0
        if 0x80 <= t <= 0x8F:
            count = 2 * (t & 0x0F)  # fixmap: keys and values
        elif 0x90 <= t <= 0x9F:
            count = t & 0x0F
        elif 0xA0 <= t <= 0xBF:
            pos += t & 0x1F
        elif t in _FIXED:
            pos += _FIXED[t]
        elif t in _SIZED:
            width, ext = _SIZED[t]
            pos += width + ext + int.from_bytes(buf[pos : pos + width], "big")
        elif t in _CONTAINERS:
            width, per = _CONTAINERS[t]
            count = per * int.from_bytes(buf[pos : pos + width], "big")
            pos += width
        if count:
            if len(pending) > limit:
                raise DecodeError(f"containers nested deeper than {limit} levels")
            pending.append(count)


class TensorSink(Protocol):
    """Encoder side of a buffer channel (PEP 574 ``buffer_callback``)."""

    def new_message(self) -> None:
        """Called once at the start of every :meth:`Encoder.encode`."""
        ...

    def export(self, tensor: torch.Tensor) -> dict[str, Any] | None:
        """Take ``tensor`` out-of-band and return a msgpack-native handle, or ``None`` to decline
        (the tensor then travels as a frame)."""
        ...


class TensorSource(Protocol):
    """Decoder side of a buffer channel (PEP 574 ``buffers=``)."""

    def open(
        self, dtype: torch.dtype, shape: tuple[int, ...], handle: dict[str, Any]
    ) -> torch.Tensor:
        """Return the tensor ``handle`` stands for; must check it has ``dtype`` and ``shape``."""
        ...


class InlineChannel:
    """The default channel: declines every tensor, so buffers travel as frames."""

    def new_message(self) -> None:
        pass

    def export(self, tensor: torch.Tensor) -> dict[str, Any] | None:
        return None

    def open(
        self, dtype: torch.dtype, shape: tuple[int, ...], handle: dict[str, Any]
    ) -> torch.Tensor:
        raise DecodeError(
            f"a {dtype} tensor of shape {list(shape)} arrived as a channel handle, "
            "but this decoder has no channel to open it"
        )


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat uint8 view of a CPU contiguous tensor's bytes (works for bf16, which numpy lacks)."""
    return t.reshape(-1).view(torch.uint8).numpy().data


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()``, also for dtypes without a copy kernel (int1, bits16, ...): the copy is
    done on a same-size integer view, which any strides allow."""
    if t.is_contiguous():
        return t
    as_int = _SAME_SIZE_INT.get(t.element_size())
    return t.contiguous() if as_int is None else t.view(as_int).contiguous().view(t.dtype)


class Encoder:
    """Encode nested messages (dicts, lists, tuples, dataclasses, msgspec Structs, scalars, numpy
    arrays, torch tensors of every non-quantized dtype) into frames.

    Non-contiguous tensors are made contiguous; non-CPU tensors declined by the sink are copied to
    the host. Not thread-safe: the frame list lives on the encoder during :meth:`encode`.
    """

    def __init__(
        self, sink: TensorSink | None = None, inline_threshold: int = DEFAULT_INLINE_THRESHOLD
    ):
        if inline_threshold < 0:
            raise ValueError(f"inline_threshold must be >= 0, got {inline_threshold}")
        self.sink: TensorSink = InlineChannel() if sink is None else sink
        self.inline_threshold = inline_threshold
        self._msgpack = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._payload = msgspec.msgpack.Encoder()
        self._frames: list[Frame] = []
        self._n_tensors = 0

    def encode(self, obj: Any) -> list[Frame]:
        """``[header, *buffers]``; buffers are zero-copy views of the tensors' memory."""
        self._start()
        try:
            return [self._msgpack.encode(obj), *self._frames]
        finally:
            self._frames = []

    def encode_into(self, obj: Any, buf: bytearray) -> list[Frame]:
        """Like :meth:`encode`, but the header is written into (and returned as) ``buf``."""
        self._start()
        try:
            self._msgpack.encode_into(obj, buf)
            return [buf, *self._frames]
        finally:
            self._frames = []

    def _start(self) -> None:
        self.sink.new_message()
        self._frames, self._n_tensors = [], 0

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._encode_tensor(obj)
        if isinstance(obj, np.ndarray | np.generic):
            return self._encode_ndarray(np.asarray(obj))
        raise TypeError(f"object of type {type(obj).__name__} is not serializable")

    def _ext(
        self, code: int, dtype: str, shape: Sequence[int], kind: int, data: Any
    ) -> msgspec.msgpack.Ext:
        return msgspec.msgpack.Ext(code, self._payload.encode((dtype, tuple(shape), kind, data)))

    def _frame(self, data: memoryview) -> int:
        self._frames.append(data)
        return len(self._frames) - 1

    def _encode_tensor(self, t: torch.Tensor) -> msgspec.msgpack.Ext:
        index, self._n_tensors = self._n_tensors, self._n_tensors + 1
        name = str(t.dtype).removeprefix("torch.")
        if name not in TORCH_DTYPES:
            raise TypeError(f"tensor {index}: dtype {t.dtype} is not supported (quantized)")
        if t.layout != torch.strided:
            raise TypeError(f"tensor {index}: layout {t.layout} is not supported (only strided)")
        if t.device.type == "meta":
            raise TypeError(f"tensor {index}: device meta has no data to send")
        t = _contiguous(t.detach().resolve_conj().resolve_neg())
        nbytes = t.numel() * t.element_size()
        shape = tuple(t.shape)
        if nbytes < self.inline_threshold and t.device.type == "cpu":
            return self._ext(EXT_TENSOR, name, shape, INLINE, _tensor_bytes(t))
        handle = self.sink.export(t)
        if handle is not None:
            return self._ext(EXT_TENSOR, name, shape, HANDLE, handle)
        return self._ext(EXT_TENSOR, name, shape, FRAME, self._frame(_tensor_bytes(t.cpu())))

    def _encode_ndarray(self, a: np.ndarray) -> msgspec.msgpack.Ext:
        if a.dtype.kind in "OV":
            raise TypeError(f"ndarray of dtype {a.dtype} is not supported (objects or void)")
        data = np.ascontiguousarray(a).reshape(-1).view(np.uint8).data
        if a.ndim == 0 or a.nbytes < self.inline_threshold:
            return self._ext(EXT_NDARRAY, a.dtype.str, a.shape, INLINE, data)
        return self._ext(EXT_NDARRAY, a.dtype.str, a.shape, FRAME, self._frame(data))


def _numpy_dtype(name: str) -> np.dtype:
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"ndarray: unknown dtype {name!r}") from exc
    if dtype.kind in "OV" or dtype.hasobject or dtype.itemsize == 0:
        raise DecodeError(f"ndarray: dtype {name!r} is not allowed (objects, void or zero-size)")
    return dtype


class Decoder:
    """Decode frames produced by :class:`Encoder`.

    ``type`` is an optional msgspec type (dataclass, Struct, ``tuple[...]``...) to validate and
    rebuild; untyped decoding returns dicts and lists. Inline data is copied (the result owns its
    memory); frame data is zero-copy when the frame is writable. Not thread-safe.
    """

    def __init__(self, type: Any = Any, source: TensorSource | None = None):
        self.source: TensorSource = InlineChannel() if source is None else source
        self._msgpack = msgspec.msgpack.Decoder(
            type, ext_hook=self._ext_hook, dec_hook=self._dec_hook
        )
        self._payload = msgspec.msgpack.Decoder(_Payload)
        self._frames: Sequence[Frame] = ()
        self._used: set[int] = set()
        self._n_tensors = 0

    def decode(self, frames: Sequence[Frame]) -> Any:
        """Rebuild the message from ``[header, *buffers]``; raises :class:`DecodeError` on bad input."""
        if isinstance(frames, bytes | bytearray | memoryview) or not isinstance(frames, Sequence):
            raise DecodeError(f"frames must be a sequence of buffers, got {type(frames).__name__}")
        if not frames:
            raise DecodeError("no frames: the header frame is missing")
        for i, frame in enumerate(frames):
            if not isinstance(frame, bytes | bytearray | memoryview):
                raise DecodeError(f"frame {i} is a {type(frame).__name__}, not a buffer")
        check_depth(frames[0])
        self._frames, self._used, self._n_tensors = frames, set(), 0
        try:
            obj = self._msgpack.decode(frames[0])
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError included
            raise DecodeError(f"bad header: {exc}") from exc
        finally:
            self._frames = ()
        if len(self._used) != len(frames) - 1:
            raise DecodeError(
                f"{len(frames) - 1} buffer frames were sent but the header refers to {len(self._used)}"
            )
        return obj

    def _dec_hook(self, type_: type, obj: Any) -> Any:
        if isinstance(type_, type) and isinstance(obj, type_):
            return obj
        raise TypeError(f"expected {type_.__name__}, got {type(obj).__name__}")

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code not in (EXT_TENSOR, EXT_NDARRAY):
            raise DecodeError(f"unknown extension code {code}")
        what = f"tensor {self._n_tensors}" if code == EXT_TENSOR else "ndarray"
        check_depth(data)  # a channel handle is a map, and maps nest
        try:
            dtype_name, shape, kind, value = self._payload.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise DecodeError(f"{what}: bad payload: {exc}") from exc
        if len(shape) > MAX_NDIM or any(not 0 <= d <= MAX_DIM for d in shape):
            raise DecodeError(f"{what}: bad shape {list(shape)}")
        if code == EXT_NDARRAY:
            return self._decode_ndarray(dtype_name, shape, kind, value)
        self._n_tensors += 1
        return self._decode_tensor(what, dtype_name, shape, kind, value)

    def _buffer(self, what: str, kind: int, value: Any, nbytes: int) -> memoryview:
        """The bytes behind an INLINE or FRAME payload, checked against the declared size.

        Inline bytes are copied so the result owns its memory; frames are zero-copy when writable.
        """
        if kind == INLINE and isinstance(value, bytes):
            data, copy = memoryview(value), True
        elif kind == FRAME and isinstance(value, int):
            n_frames = len(self._frames) - 1
            if not 0 <= value < n_frames:
                raise DecodeError(f"{what}: frame index {value} out of range ({n_frames} frames)")
            if value in self._used:
                raise DecodeError(f"{what}: frame {value} is referenced twice")
            self._used.add(value)
            data = memoryview(self._frames[value + 1])
            copy = data.readonly or not data.c_contiguous  # torch needs writable flat memory
        else:
            raise DecodeError(
                f"{what}: kind {kind} does not match data of type {type(value).__name__}"
            )
        if data.nbytes != nbytes:
            raise DecodeError(
                f"{what}: shape and dtype declare {nbytes} bytes, data has {data.nbytes}"
            )
        return memoryview(bytearray(data)) if copy else data.cast("B")

    def _decode_tensor(
        self, what: str, dtype_name: str, shape: tuple[int, ...], kind: int, value: Any
    ):
        dtype = TORCH_DTYPES.get(dtype_name)
        if dtype is None:
            raise DecodeError(f"{what}: unknown dtype {dtype_name!r}")
        if kind == HANDLE:
            if not isinstance(value, dict):
                raise DecodeError(f"{what}: handle must be a map, got {type(value).__name__}")
            return self.source.open(dtype, shape, value)
        data = self._buffer(what, kind, value, math.prod(shape) * dtype.itemsize)
        if data.nbytes == 0:  # torch.frombuffer rejects empty buffers
            try:  # allocating complex32 warns that it is experimental: its 4 bytes as int32
                alloc = torch.int32 if dtype == torch.complex32 else dtype
                return torch.empty(shape, dtype=alloc).view(dtype)
            except RuntimeError as exc:  # e.g. strides of a zero-sized shape overflow
                raise DecodeError(f"{what}: bad shape {list(shape)}: {exc}") from exc
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)

    def _decode_ndarray(self, dtype_name: str, shape: tuple[int, ...], kind: int, value: Any):
        dtype = _numpy_dtype(dtype_name)
        data = self._buffer("ndarray", kind, value, math.prod(shape) * dtype.itemsize)
        try:
            return np.frombuffer(data, dtype=dtype).reshape(shape)
        except ValueError as exc:  # e.g. a zero-sized shape numpy still finds too big
            raise DecodeError(f"ndarray: bad shape {list(shape)}: {exc}") from exc
