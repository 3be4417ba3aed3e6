"""The msgpack codec: round trips, the inline/out-of-band boundary, and malformed input."""

from __future__ import annotations

import dataclasses
import tracemalloc

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mx_reference.ipc import DEFAULT_INLINE_THRESHOLD, DecodeError, Decoder, Encoder
from mx_reference.ipc.codec import EXT_TENSOR, FRAME, HANDLE, INLINE, MAX_DEPTH, TORCH_DTYPES


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs and -0.0 included) for every dtype."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(_bytes(a), _bytes(b))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # int1, bits16 and friends have no copy kernel: copy through a same-size integer view
    same = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    t = t.contiguous() if same is None else t.view(same).contiguous()
    return t.reshape(-1).view(torch.uint8)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype`` (covers every dtype, bf16 and float8 included)."""
    g = torch.Generator().manual_seed(seed)
    nbytes = max(1, int(np.prod(shape))) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)[: int(np.prod(shape))].reshape(shape)


DTYPES = sorted(TORCH_DTYPES.values(), key=str)
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@given(st.sampled_from(DTYPES), shapes, st.integers(0, 2**16), st.booleans())
def test_tensor_round_trip_every_dtype(dtype, shape, seed, transpose):
    t = random_tensor(dtype, shape, seed)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous: made contiguous on the way
    frames = Encoder().encode({"t": t})
    out = Decoder().decode(frames)["t"]
    assert same_bits(out, t)
    assert out.is_contiguous()


@pytest.mark.parametrize(
    "numel, frames_expected", [(63, 1), (64, 2), (65, 2)]
)  # float32: 252 B inline, 256 B and 260 B out-of-band
def test_threshold_is_strict(numel, frames_expected):
    t = torch.arange(numel, dtype=torch.float32)
    frames = Encoder().encode(t)
    assert len(frames) == frames_expected
    assert torch.equal(Decoder().decode(frames), t)


def test_buffer_count_and_zero_copy_send():
    big = torch.arange(1000, dtype=torch.float32)
    msg = {
        "small": torch.ones(3),
        "scalar": torch.tensor(7.0),
        "empty": torch.empty(0, 4),
        "slice": big[::100],  # small non-contiguous slice: inline
        "bigs": [big, big.to(torch.bfloat16), np.arange(100.0)],
        "zero_d": np.array(3.5),  # 0-d arrays always inline
    }
    frames = Encoder().encode(msg)
    assert len(frames) == 1 + 3
    assert frames[1].nbytes == 4000
    big[0] = 42.0  # frames are views of the tensor: no copy on send
    assert Decoder().decode(frames)["bigs"][0][0] == 42.0


def test_encode_into_reuses_the_callers_buffer():
    buf = bytearray(16)
    frames = Encoder().encode_into({"t": torch.arange(100.0)}, buf)
    assert frames[0] is buf and len(frames) == 2
    assert torch.equal(Decoder().decode(frames)["t"], torch.arange(100.0))


def test_inline_owns_memory_and_frames_are_zero_copy_when_writable():
    t = torch.arange(1000, dtype=torch.int32)
    header, frame = Encoder().encode({"a": t, "b": torch.ones(2)})
    writable = bytearray(frame)
    out = Decoder().decode([header, writable])
    writable[:4] = b"\x07\x00\x00\x00"
    assert out["a"][0] == 7  # aliases the writable frame
    out_ro = Decoder().decode([header, bytes(frame)])  # read-only frame: copied once
    assert out_ro["a"][0] == 0 and out_ro["b"].sum() == 2


@dataclasses.dataclass
class Prompt:
    tokens: torch.Tensor
    embeds: torch.Tensor | None
    pair: tuple[int, str]
    scores: np.ndarray


class Step(msgspec.Struct, array_like=True):  # Structs may travel as lists
    prompt: Prompt
    weights: dict[str, torch.Tensor]


def test_typed_round_trip_dataclass_struct_tuple_and_optional_none():
    step = Step(
        Prompt(torch.arange(500), None, (3, "x"), np.linspace(0, 1, 80)),
        {"w": torch.randn(40, 40).to(torch.bfloat16), "b": torch.zeros(2)},
    )
    out = Decoder(Step).decode(Encoder().encode(step))
    assert isinstance(out, Step) and isinstance(out.prompt, Prompt)
    assert out.prompt.embeds is None and out.prompt.pair == (3, "x")
    assert torch.equal(out.prompt.tokens, step.prompt.tokens)
    assert same_bits(out.weights["w"], step.weights["w"])
    assert np.array_equal(out.prompt.scores, step.prompt.scores)


def test_typed_decode_rejects_a_tensor_where_an_array_is_declared():
    frames = Encoder().encode(
        {"tokens": torch.ones(2), "embeds": None, "pair": (1, "a"), "scores": torch.ones(2)}
    )
    with pytest.raises(DecodeError, match="scores"):
        Decoder(Prompt).decode(frames)


@given(
    st.sampled_from(["<f4", ">f8", "<i2", "|u1", "|b1", "<c16", "<U3", "|S2", "<M8[s]"]),
    shapes,
)
def test_ndarray_round_trip(dtype, shape):
    a = np.frombuffer(
        np.random.default_rng(0).bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype
    )
    a = a.reshape(shape)
    out = Decoder().decode(Encoder().encode([a]))[0]
    assert out.dtype == a.dtype and out.shape == a.shape
    assert out.tobytes() == a.tobytes()


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize(
    "make_bad, field",
    [
        (lambda: np.array([object()]), "dtype"),
        (lambda: np.zeros(2, dtype=[("a", "<f4")]), "dtype"),
        (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8), "dtype"),
        (lambda: torch.ones(2).to_sparse(), "layout"),
        (lambda: torch.ones(2, device="meta"), "device"),
        (object, "object"),
    ],
)
def test_encoder_rejects_what_it_cannot_carry(make_bad, field):
    with pytest.raises(TypeError, match=field):
        Encoder().encode({"x": make_bad()})


def test_decoder_rejects_unknown_dtype_and_ext_codes():
    payload = msgspec.msgpack.encode(("torch_load", (2,), INLINE, b"\0" * 8))
    header = msgspec.msgpack.encode({"t": msgspec.msgpack.Ext(EXT_TENSOR, payload)})
    with pytest.raises(DecodeError, match="unknown dtype 'torch_load'"):
        Decoder().decode([header])
    with pytest.raises(DecodeError, match="extension code 9"):
        Decoder().decode([msgspec.msgpack.encode(msgspec.msgpack.Ext(9, b""))])
    obj = msgspec.msgpack.encode(("|O", (1,), INLINE, b"\0" * 8))
    with pytest.raises(DecodeError, match="not allowed"):
        Decoder().decode([msgspec.msgpack.encode(msgspec.msgpack.Ext(2, obj))])


def ext_tensor(shape, kind, data, dtype="float32"):
    payload = msgspec.msgpack.encode((dtype, shape, kind, data))
    return msgspec.msgpack.encode(msgspec.msgpack.Ext(EXT_TENSOR, payload))


@pytest.mark.parametrize(
    "frames, match",
    [
        ([ext_tensor((2**40, 2**40), INLINE, b"\0" * 8)], "declare"),  # absurd size, 8 bytes
        ([ext_tensor((4,), FRAME, 0), b"\0" * 15], "declare"),  # truncated frame
        ([ext_tensor((4,), FRAME, 1), b"\0" * 16], "out of range"),
        ([ext_tensor((4,), FRAME, 0), b"\0" * 16, b"extra"], "2 buffer frames"),
        ([msgspec.msgpack.encode([1])[:0]], "bad header"),
        ([ext_tensor((-1,), INLINE, b"")], "bad payload|bad shape"),
        ([ext_tensor((0, 2**48, 2**48, 2**48), INLINE, b"")], "bad shape"),
        ([ext_tensor((4,), HANDLE, {"producer": "p0"})], "no channel"),
        ([ext_tensor((4,), HANDLE, 3)], "does not match|handle must be a map"),
        (b"\x90", "sequence of buffers"),
        ([], "header frame is missing"),
        ([ext_tensor((1,), FRAME, 0), 5], "not a buffer"),
    ],
)
def test_malformed_frames_raise_decode_error(frames, match):
    with pytest.raises(DecodeError, match=match):
        Decoder().decode(frames)


def test_frame_referenced_twice():
    header = msgspec.msgpack.encode(
        [msgspec.msgpack.Ext(EXT_TENSOR, msgspec.msgpack.encode(("uint8", (1,), FRAME, 0)))] * 2
    )
    with pytest.raises(DecodeError, match="referenced twice"):
        Decoder().decode([header, b"x"])


@pytest.mark.parametrize(
    "header",
    [
        b"\x91" * 1000 + b"\xc0",  # fixarrays: msgspec itself raised RecursionError here
        b"\x81\xa1k" * 500 + b"\xc0",  # fixmaps
        b"\xdd\x00\x00\x00\x01" * 200 + b"\xc0",  # array32
        b"\x91" * (MAX_DEPTH + 1) + b"\xc0",  # one level past the cap
    ],
    ids=["fixarray-1000", "fixmap-500", "array32-200", "cap+1"],
)
@pytest.mark.reliability
def test_deep_nesting_is_a_decode_error_not_a_recursion_error(header):
    with pytest.raises(DecodeError, match=f"nested deeper than {MAX_DEPTH} levels"):
        Decoder().decode([header])


def test_nesting_up_to_the_cap_decodes():
    value = None
    for _ in range(MAX_DEPTH):
        value = [value]
    assert Decoder().decode(Encoder().encode(value)) == value


def test_a_deep_channel_handle_inside_a_tensor_is_a_decode_error():
    fields = b"".join(msgspec.msgpack.encode(x) for x in ("float32", (4,), HANDLE))
    raw = b"\x94" + fields + b"\x81\xa1k" * 2000 + b"\x00"  # a handle of 2000 nested maps
    with pytest.raises(DecodeError, match="nested deeper"):
        Decoder().decode([msgspec.msgpack.encode(msgspec.msgpack.Ext(EXT_TENSOR, raw))])


@given(st.binary(max_size=200), st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_random_bytes_only_raise_decode_error(header, buffers):
    try:
        Decoder().decode([header, *buffers])
    except DecodeError:
        pass


@given(st.data())
def test_fuzz_mutated_valid_messages(data):
    msg = {
        "a": torch.arange(100, dtype=torch.int16),
        "b": [torch.ones(3), np.arange(70.0)],
        "c": "x",
    }
    header, *buffers = Encoder().encode(msg)
    header = bytearray(header)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(header) - 1))
        header[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(header)))
    tracemalloc.start()
    try:
        Decoder().decode([bytes(header[:cut]), *buffers])
    except DecodeError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing large was allocated from a declared size


def test_default_threshold_matches_vllm():
    assert DEFAULT_INLINE_THRESHOLD == 256
    with pytest.raises(ValueError, match="inline_threshold"):
        Encoder(inline_threshold=-1)
