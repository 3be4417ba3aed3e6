"""The refit wire: shard descriptors, per-rank source manifests, the publisher endpoint, the
shard digest and the arena alignment. Everything a publisher and a receiver must agree on.

Our own versioned msgspec schema, encoded as msgpack. Nothing here is ever pickled, and no
transport's own descriptor blobs travel in it: a publisher's transport metadata rides along as
opaque ``agent_metadata`` bytes (an :class:`Endpoint`) that only the transport interprets. Only
real tensors are described: a zero-size or ``__mx_``-prefixed sidecar entry is rejected, because
one such entry in a NIXL descriptor list once failed a whole transfer.

Each descriptor's ``style`` is its tensor-parallel style (the same sense as vLLM's
``ColumnParallelLinear``/``RowParallelLinear`` or torch's ``ColwiseParallel``). Range semantics
along ``shard_axis`` (end-exclusive, in rows of the global tensor):

* ``column``, ``row``, ``vocab_parallel``, ``expert_row``, ``qkv_column``: the shard holds
  global rows ``[lo, hi)`` of the global Megatron tensor (for ``qkv_column`` the global tensor is
  interleaved per query group, so a group-aligned range is self-contained).
* ``gated_mlp_column``, ``expert_column``: the global tensor is ``[gate; up]`` and the range is
  along each half: the shard holds ``[gate[lo:hi]; up[lo:hi]]``, Megatron's per-rank fc1 layout.
* ``replicated``: the whole tensor (``shard_range`` is ``None``).

Expert tensors come in two layouts: per-expert (one tensor per expert, ``expert_ids`` is the
one global id; besides the expert styles, HF-style ``column``/``row`` pieces such as a separate
``gate_proj`` may carry it) and grouped (3-D, experts stacked on axis 0, ``expert_ids`` is the
contiguous run of global ids this rank holds, ``shard_axis`` is the within-expert axis).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import msgspec
import torch
import xxhash

# 2: shard digests are BLAKE3 (were SHA-256); 3: position checksums; 4: digests are XXH3-128
SCHEMA_VERSION = 4

STYLES = (
    "column",
    "row",
    "qkv_column",
    "gated_mlp_column",
    "vocab_parallel",
    "replicated",
    "expert_column",
    "expert_row",
)
GATED_STYLES = ("gated_mlp_column", "expert_column")
EXPERT_STYLES = ("expert_column", "expert_row")
PLACEMENTS = ("replicate", "shard", "partial")
SOURCE_KINDS = ("trainer", "replica")
SIDECAR_PREFIX = "__mx_"
ALIGNMENT = 64  # bytes between tensors in every arena: each one starts aligned for any dtype

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the spelling the wire uses."""
    return str(dtype).removeprefix("torch.")


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGNMENT`."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def gated_segments(extent: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Rows ``[lo, hi)`` of each half of a ``[gate; up]`` axis of ``extent`` rows."""
    half = extent // 2
    return [(lo, hi), (half + lo, half + hi)]


def _bad(name: str, field: str, why: str) -> ValueError:
    return ValueError(f"tensor {name!r}: field {field!r}: {why}")


class ShardDescriptor(msgspec.Struct, frozen=True, kw_only=True):
    """One tensor shard a publisher exposes: what it is, where it sits, which rows it holds."""

    name: str
    global_shape: tuple[int, ...]
    dtype: str
    style: str = "replicated"  # the tensor-parallel style, one of STYLES
    placement: str = "replicate"
    shard_axis: int = 0
    shard_range: tuple[int, int] | None = None
    expert_ids: tuple[int, ...] = ()
    num_experts: int = 0
    num_heads: int = 0  # qkv_column: query heads of the whole model
    num_kv_heads: int = 0  # qkv_column: key/value heads (query groups)
    nbytes: int = 0
    offset: int = 0  # inside the publisher's registered region
    digest: str = ""  # optional content digest of the shard bytes (shard_digest)
    checksum: int | None = None  # optional position checksum of the shard (shard_checksum)

    def __post_init__(self) -> None:
        self._validate()

    @property
    def grouped(self) -> bool:
        """A stacked expert tensor: experts on axis 0, this rank's run in ``expert_ids``."""
        return self.style in EXPERT_STYLES and len(self.global_shape) == 3

    @property
    def per_expert(self) -> bool:
        """One expert's own tensor (a receiver pulls it only if it owns that expert)."""
        return bool(self.expert_ids) and not self.grouped

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Shape of the shard tensor this descriptor describes."""
        shape = list(self.global_shape)
        if self.shard_range is not None:
            lo, hi = self.shard_range
            shape[self.shard_axis] = (hi - lo) * (2 if self.style in GATED_STYLES else 1)
        if self.grouped:
            shape[0] = len(self.expert_ids)
        return tuple(shape)

    @property
    def element_size(self) -> int:
        return DTYPES[self.dtype].itemsize

    def segments(self) -> list[tuple[int, int]]:
        """Global rows ``[lo, hi)`` along ``shard_axis`` this shard holds, in local order."""
        if self.shard_range is None:
            return [(0, self.global_shape[self.shard_axis])]
        lo, hi = self.shard_range
        if self.style in GATED_STYLES:
            return gated_segments(self.global_shape[self.shard_axis], lo, hi)
        return [(lo, hi)]

    def _validate(self) -> None:
        n = self.name
        if not n or n.startswith(SIDECAR_PREFIX):
            raise _bad(n, "name", f"empty or reserved {SIDECAR_PREFIX!r} sidecar name")
        if self.style not in STYLES:
            raise _bad(n, "style", f"unknown style {self.style!r}; known: {', '.join(STYLES)}")
        if self.placement not in PLACEMENTS:
            raise _bad(n, "placement", f"unknown placement {self.placement!r}")
        if self.dtype not in DTYPES:
            raise _bad(n, "dtype", f"unknown dtype {self.dtype!r}")
        if not self.global_shape or any(d <= 0 for d in self.global_shape):
            raise _bad(n, "global_shape", f"{self.global_shape} must be non-empty and positive")
        if not 0 <= self.shard_axis < len(self.global_shape):
            raise _bad(n, "shard_axis", f"{self.shard_axis} out of range for {self.global_shape}")
        extent = self.global_shape[self.shard_axis]
        if self.style in GATED_STYLES:
            if extent % 2:
                raise _bad(n, "global_shape", f"gated [gate; up] extent {extent} is odd")
            extent //= 2
        if self.shard_range is None:
            if self.placement == "shard" and not self.grouped:
                raise _bad(n, "shard_range", "placement 'shard' needs a range")
        else:
            lo, hi = self.shard_range
            if not 0 <= lo < hi <= extent:
                raise _bad(n, "shard_range", f"[{lo}, {hi}) not inside [0, {extent})")
        if self.style == "qkv_column":
            self._validate_heads()
        if self.style in EXPERT_STYLES or self.expert_ids:
            self._validate_experts()
        want = math.prod(self.local_shape) * self.element_size
        if self.nbytes != want:
            raise _bad(n, "nbytes", f"{self.nbytes} != {want} for local shape {self.local_shape}")
        if self.offset < 0:
            raise _bad(n, "offset", f"{self.offset} is negative")

    def _validate_heads(self) -> None:
        n, h, g = self.name, self.num_heads, self.num_kv_heads
        if h <= 0 or g <= 0 or h % g:
            raise _bad(n, "num_kv_heads", f"{g} must be positive and divide num_heads={h}")
        if self.global_shape[0] % (h + 2 * g):
            raise _bad(n, "global_shape", f"{self.global_shape[0]} rows not a multiple of H+2G")
        if self.shard_range is not None:
            group_rows = self.global_shape[0] // g
            lo, hi = self.shard_range
            if lo % group_rows or hi % group_rows:
                raise _bad(n, "shard_range", f"[{lo}, {hi}) not aligned to query groups")

    def _validate_experts(self) -> None:
        n, ids, e = self.name, self.expert_ids, self.num_experts
        if self.style in ("replicated", "qkv_column", "vocab_parallel"):
            raise _bad(n, "expert_ids", f"set on non-expert style {self.style!r}")
        if not ids or e <= 0 or not all(0 <= i < e for i in ids):
            raise _bad(n, "expert_ids", f"{ids} must be non-empty ids in [0, num_experts={e})")
        if self.grouped:
            if ids != tuple(range(ids[0], ids[0] + len(ids))) or self.global_shape[0] != e:
                raise _bad(n, "expert_ids", f"{ids} must be a contiguous run of axis 0 ({e})")
            if self.shard_axis == 0:
                raise _bad(n, "shard_axis", "axis 0 of a grouped expert tensor holds experts")
        elif len(ids) != 1:
            raise _bad(n, "expert_ids", f"a per-expert tensor names one expert, got {ids}")


class SourceManifest(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one publisher rank tells receivers about one version of its weights."""

    schema_version: int = SCHEMA_VERSION
    model_id: str
    version: int  # training step
    revision: str = ""  # content digest of the weights
    source_kind: str = "trainer"  # one of SOURCE_KINDS
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    agent_metadata: bytes = b""  # the transport's own, opaque here
    tensors: tuple[ShardDescriptor, ...] = ()
    layout_signature: str = ""
    names_digest: str = ""
    # the descriptors' digests and checksums come after the manifest, as Signatures: the
    # publisher hashes while receivers pull (PublisherConfig.sign_later)
    signed_later: bool = False

    @property
    def world_size(self) -> int:
        """How many publisher ranks make up one version."""
        return self.tp_size * self.pp_size * self.ep_size

    @property
    def rank(self) -> int:
        """This publisher's slot in ``[0, world_size)``; never a global torch rank."""
        return (self.pp_rank * self.ep_size + self.ep_rank) * self.tp_size + self.tp_rank


def layout_signature(tensors, *, tp=(0, 1), pp=(0, 1), ep=(0, 1)) -> str:
    """SHA-256 over the sorted per-tensor layouts plus the (rank, size) position.

    Version-independent (no step, no digest, no offsets) and topology-sensitive: it keys caches.
    """
    rows = sorted(
        (
            d.name,
            d.global_shape,
            d.dtype,
            d.placement,
            d.style,
            d.shard_axis,
            d.shard_range,
            d.expert_ids,
            d.num_heads,
            d.num_kv_heads,
        )
        for d in tensors
    )
    return hashlib.sha256(msgspec.msgpack.encode([tp, pp, ep, rows])).hexdigest()


def name_digest(names) -> str:
    """SHA-256 of the ordered name sequence (order matters: it is what a receiver iterates)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def make_manifest(
    model_id: str,
    version: int,
    tensors,
    *,
    tp: tuple[int, int] = (0, 1),
    pp: tuple[int, int] = (0, 1),
    ep: tuple[int, int] = (0, 1),
    revision: str = "",
    source_kind: str = "trainer",
    agent_metadata: bytes = b"",
    signed_later: bool = False,
) -> SourceManifest:
    """A validated manifest with its signature and name digest filled in.

    ``tp``, ``pp`` and ``ep`` are ``(rank, size)`` pairs of the parallel groups, not global ranks.
    """
    tensors = tuple(tensors)
    m = SourceManifest(
        model_id=model_id,
        version=version,
        revision=revision,
        source_kind=source_kind,
        tp_rank=tp[0],
        tp_size=tp[1],
        pp_rank=pp[0],
        pp_size=pp[1],
        ep_rank=ep[0],
        ep_size=ep[1],
        agent_metadata=agent_metadata,
        tensors=tensors,
        layout_signature=layout_signature(tensors, tp=tp, pp=pp, ep=ep),
        names_digest=name_digest(d.name for d in tensors),
        signed_later=signed_later,
    )
    validate_manifest(m)
    return m


def validate_manifest(m: SourceManifest) -> None:
    """Cross-field checks that the per-descriptor ``__post_init__`` cannot see."""
    where = f"manifest {m.model_id!r} v{m.version}"
    if m.schema_version > SCHEMA_VERSION:
        raise ValueError(
            f"{where}: field 'schema_version': {m.schema_version} is newer than "
            f"this reader ({SCHEMA_VERSION})"
        )
    if m.source_kind not in SOURCE_KINDS:
        raise ValueError(f"{where}: field 'source_kind': unknown {m.source_kind!r}")
    for field in ("tp", "pp", "ep"):
        rank, size = getattr(m, f"{field}_rank"), getattr(m, f"{field}_size")
        if not 0 <= rank < size:
            raise ValueError(f"{where}: field '{field}_rank': {rank} not in [0, {size})")
    names = [d.name for d in m.tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: field 'tensors': duplicate tensor names")
    pos = ((m.tp_rank, m.tp_size), (m.pp_rank, m.pp_size), (m.ep_rank, m.ep_size))
    if m.layout_signature != layout_signature(m.tensors, tp=pos[0], pp=pos[1], ep=pos[2]):
        raise ValueError(f"{where}: field 'layout_signature': does not match the descriptors")
    if m.names_digest != name_digest(names):
        raise ValueError(f"{where}: field 'names_digest': does not match the tensor names")
    if m.signed_later and any(d.digest or d.checksum is not None for d in m.tensors):
        raise ValueError(f"{where}: field 'signed_later': its descriptors carry digests")


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(SourceManifest)


def encode_manifest(m: SourceManifest) -> bytes:
    """msgpack bytes of ``m``; the only form a manifest takes on the wire."""
    return _ENCODER.encode(m)


def decode_manifest(data: bytes) -> SourceManifest:
    """Parse and validate; raises ``ValueError`` naming the tensor and field on bad input."""
    try:
        m = _DECODER.decode(data)
    except msgspec.DecodeError as e:  # ValidationError (a ValueError) carries our message
        raise ValueError(f"bad refit manifest: {e}") from None
    validate_manifest(m)
    return m


class Signatures(msgspec.Struct, frozen=True, kw_only=True):
    """The digests and checksums of a manifest published with ``signed_later``, one per
    descriptor in the manifest's order."""

    names_digest: str  # of the manifest they sign
    digests: tuple[str, ...]
    checksums: tuple[int, ...]


def sign(m: SourceManifest, signatures: Signatures) -> SourceManifest:
    """``m`` with the digests and checksums of ``signatures`` in its descriptors; ``ValueError``
    when they sign another manifest."""
    n, s = len(m.tensors), signatures
    if s.names_digest != m.names_digest or len(s.digests) != n or len(s.checksums) != n:
        raise ValueError(
            f"manifest {m.model_id!r} v{m.version} rank {m.rank}: field 'signatures': "
            f"they sign another tensor list ({len(s.digests)} digests for {n} tensors)"
        )
    tensors = tuple(
        msgspec.structs.replace(d, digest=digest, checksum=checksum)
        for d, digest, checksum in zip(m.tensors, s.digests, s.checksums, strict=True)
    )
    revision = revision_of(s.digests)
    return msgspec.structs.replace(m, tensors=tensors, revision=revision, signed_later=False)


def revision_of(digests: Sequence[str]) -> str:
    """``SourceManifest.revision``: one digest of a rank's shard digests, in manifest order."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def encode_signatures(s: Signatures) -> bytes:
    return _ENCODER.encode(s)


def decode_signatures(data: bytes) -> Signatures:
    """Parse a registry's signatures; ``ValueError`` on anything else."""
    try:
        return msgspec.msgpack.decode(data, type=Signatures)
    except msgspec.DecodeError as exc:
        raise ValueError(f"bad refit signatures: {exc}") from None


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach one publisher: ``SourceManifest.agent_metadata`` holds this, encoded.

    Each descriptor's ``offset`` is relative to ``base_addr``, on device ``device_id``.
    """

    transport_metadata: bytes
    base_addr: int
    device_id: int = 0
    source_id: str  # unique per publisher incarnation: a restarted replica never shadows a dead one
    # published in place (the trainer's own memory): where its int64 write counter lies, and
    # its value at publish; 0 for a snapshot arena, which stays as published until retired
    counter_addr: int = 0
    counter: int = 0


def encode_endpoint(e: Endpoint) -> bytes:
    return msgspec.msgpack.encode(e)


def decode_endpoint(data: bytes) -> Endpoint:
    """Parse a manifest's ``agent_metadata``; ``ValueError`` on anything else."""
    try:
        return msgspec.msgpack.decode(data, type=Endpoint)
    except msgspec.DecodeError as exc:
        raise ValueError(f"manifest agent_metadata is not a refit Endpoint: {exc}") from None


def shard_digest(*pieces: torch.Tensor, axis: int = 0) -> str:
    """Hex XXH3-128 of a shard's bytes, the convention of ``ShardDescriptor.digest``. A shard
    given as pieces is hashed as their concatenation along ``axis``; along axis 0 that is
    their bytes one after the other, so contiguous pieces are hashed where they lie.

    The digest detects corruption in flight or a stale arena; it is read from the same store
    as the manifest, so it does not authenticate the publisher, and a cryptographic hash would
    buy nothing. XXH3-128 hashes 13 GB/s on one core here, about ``copy_``'s speed (BLAKE3
    6, SHA-256 1.6), and drops the GIL: threads hashing different shards use every core."""
    if axis != 0 and len(pieces) > 1:
        pieces = (torch.cat(pieces, axis),)
    h = xxhash.xxh3_128()
    for piece in pieces:
        h.update(piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


CHECKSUM_MASK = 2**32 - 1  # checksums add modulo 2**32
_GOLDEN = -1640531527  # 0x9E3779B9 as int32: products wrap modulo 2**32
_SALT = 0x2545F491


def _weights(dim: int, start: int, size: int) -> torch.Tensor:
    """Odd int32 weights of global indices ``[start, start + size)`` along ``dim``."""
    index = torch.arange(start, start + size, dtype=torch.int32)
    return (index * _GOLDEN + ((dim + 1) * _SALT & 0x7FFFFFFF)) | 1


def _words(block: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``block``'s bytes as integer words of at most 32 bits, rows of its last dim, and how
    many int32 words an element is (8-byte elements are two)."""
    data = block.detach().contiguous().cpu()
    size = data.element_size()
    words = data.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int32}[size])
    return words.reshape(-1, words.shape[-1]), max(size // 4, 1)


_FOLD_WORDS = 1 << 18  # a block of rows whose int32 products (1 MiB) stay in cache


def _fold_rows(words: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``words @ w`` in int32, wrapping: ``(R, C)`` words of at most 32 bits, ``(C,)`` weights,
    ``(R,)`` out. torch's integer ``mv`` is a scalar loop (3x slower than ``copy_`` here); a
    vectorized multiply and row sum over cache-sized blocks runs at memory speed."""
    rows, cols = words.shape
    step = max(1, _FOLD_WORDS // max(cols, 1))
    out = torch.empty(rows, dtype=torch.int32)
    products = torch.empty(min(step, rows), cols, dtype=torch.int32)
    for lo in range(0, rows, step):
        block = products[: min(step, rows - lo)]
        torch.mul(words[lo : lo + len(block)], w, out=block)
        torch.sum(block, 1, dtype=torch.int32, out=out[lo : lo + len(block)])
    return out


def box_checksum(
    block: torch.Tensor, global_shape: tuple[int, ...], starts: tuple[int, ...]
) -> int:
    """Position checksum of ``block``, the box of a global tensor of ``global_shape`` that
    starts at ``starts``: the sum over its int32 words of ``(word + 1) * w(global index)``
    modulo 2**32, ``w`` a product of one odd weight per dim, so the whole sum is one integer
    matrix-vector product over the words (memory speed) and small ones for the other dims.

    Unlike a digest it composes: the checksums of disjoint boxes add up to the checksum of
    their union, whoever holds them. So a receiver replica whose ranks each hold other rows
    than the publishers' shards can still prove, with one collective, that together they hold
    exactly what was published. Any one changed 32-bit word changes it (its weight is odd); it
    detects corruption and stale bytes, not forgery."""
    assert len(global_shape) == block.dim() == len(starts), (global_shape, block.shape, starts)
    words, per = _words(block)
    last = block.dim() - 1
    # int32 products and sums wrap modulo 2**32: the arithmetic of the checksum
    w = _weights(last, starts[last] * per, block.shape[last] * per)
    folded = _fold_rows(words, w) + w.sum(dtype=torch.int32)  # (word + 1) * w along the last dim
    for d in reversed(range(last)):
        folded = torch.mv(folded.view(-1, block.shape[d]), _weights(d, starts[d], block.shape[d]))
    return int(folded.sum(dtype=torch.int64)) & CHECKSUM_MASK


def shard_checksum(d: ShardDescriptor, shard: torch.Tensor) -> int:
    """:func:`box_checksum` of a shard at its global position (``d.segments()`` along
    ``d.shard_axis``, ``d.expert_ids`` on axis 0 of a grouped tensor)."""
    total, at = 0, 0
    for lo, hi in d.segments():
        starts = [0] * len(d.global_shape)
        starts[d.shard_axis] = lo
        if d.grouped:
            starts[0] = d.expert_ids[0]
        piece = shard.narrow(d.shard_axis, at, hi - lo)
        total += box_checksum(piece, d.global_shape, tuple(starts))
        at += hi - lo
    return total & CHECKSUM_MASK
