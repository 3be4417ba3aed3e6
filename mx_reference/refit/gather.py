"""Collectives a receiver replica needs: a vote, and an all-gather of differently shaped shards.

Each rank of an inference replica pulls only its own TP slice; the replica then all-gathers the
slices so every rank can rebuild the full tensors. Gloo's ``allgather`` wants equal shapes, so a
rank packs its shards into one byte buffer with a msgspec header (never pickle), and the
buffers travel padded to the longest. ``group=None`` means a one-rank replica: no collective.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import torch
import torch.distributed as dist

from mx_reference.refit.wire import ALIGNMENT, DTYPES, aligned, dtype_name


class _Header(msgspec.Struct, frozen=True):
    tag: int  # the sender's own slot (e.g. its TP rank)
    tensors: list[tuple[str, tuple[int, ...], str, int]]  # name, shape, dtype, byte offset


def vote(ok: bool, group: dist.ProcessGroup | None) -> bool:
    """True when every rank of ``group`` passes ``ok=True``; all ranks learn the same answer."""
    if group is None:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    flags = [torch.empty_like(flag) for _ in range(group.size())]
    group.allgather([flags], [flag]).wait()
    return all(bool(f.item()) for f in flags)


def _pack(tag: int, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    entries, at = [], 0
    for name, t in tensors.items():
        entries.append((name, tuple(t.shape), dtype_name(t.dtype), at))
        at += aligned(t.numel() * t.element_size())
    header = msgspec.msgpack.encode(_Header(tag, entries))
    start = ALIGNMENT + aligned(len(header))  # every tensor starts aligned for its view
    buf = torch.zeros(start + at, dtype=torch.uint8)  # (8 + header + payload,) uint8
    buf[:8] = torch.tensor([len(header)], dtype=torch.int64).view(torch.uint8)
    buf[ALIGNMENT : ALIGNMENT + len(header)] = torch.frombuffer(
        bytearray(header), dtype=torch.uint8
    )
    for (_, _, _, offset), t in zip(entries, tensors.values(), strict=True):
        raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        buf[start + offset : start + offset + raw.numel()] = raw
    return buf


def _unpack(buf: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    n = int(buf[:8].view(torch.int64).item())
    header = msgspec.msgpack.decode(buf[ALIGNMENT : ALIGNMENT + n].numpy().tobytes(), type=_Header)
    payload, out = buf[ALIGNMENT + aligned(n) :], {}
    for name, shape, dtype, at in header.tensors:
        dt = DTYPES[dtype]
        nbytes = int(torch.Size(shape).numel()) * dt.itemsize
        out[name] = payload[at : at + nbytes].view(dt).reshape(shape)
    return header.tag, out


def all_gather_shards(
    tag: int, tensors: Mapping[str, torch.Tensor], group: dist.ProcessGroup | None
) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """``(tag, tensors)`` of every rank in ``group`` (group rank order); CPU tensors out."""
    if group is None:
        return [(tag, dict(tensors))]
    packed = _pack(tag, tensors)
    size = torch.tensor([packed.numel()], dtype=torch.int64)
    sizes = [torch.empty_like(size) for _ in range(group.size())]
    group.allgather([sizes], [size]).wait()
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: packed.numel()] = packed
    bufs = [torch.empty_like(padded) for _ in range(group.size())]
    group.allgather([bufs], [padded]).wait()
    return [_unpack(b[: int(s.item())]) for b, s in zip(bufs, sizes, strict=True)]
