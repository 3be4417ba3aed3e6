"""Slice planner: which rows of which source shard land where in this receiver's tensors.

Inputs are the source manifests (one per trainer rank) and the :class:`TargetLayout` the
receiver reports (its TP/EP position, never derived from a global rank). For every tensor the
plan lists :class:`Piece` s in rows along the shard axis (plus an expert range for grouped MoE
tensors) and, where the rows are contiguous, the byte span a transport can read directly.
Coverage is proven before any byte moves: gaps, overlaps, disagreeing shapes or dtypes, partial
placements and missing experts land in ``plan.missing`` and :meth:`RefitPlan.require_complete`
refuses such a plan.

A plan holds no offsets of the publishers' regions and no agent metadata: a cached plan outlives
the version it was built from, so a transport takes those from the current manifests.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import NamedTuple

import torch

from mx_reference.refit.layouts import RefitModelConfig, expert_range, rank_segments
from mx_reference.refit.wire import DTYPES, ShardDescriptor, SourceManifest


@dataclass(frozen=True)
class TargetLayout:
    """Where the receiver sits: reported by the receiver itself, not derived from its global
    rank (under TP+PP the two differ)."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    vocab_divisible_by: int = 128

    def __post_init__(self) -> None:
        for f in ("tp", "ep"):
            rank, size = getattr(self, f"{f}_rank"), getattr(self, f"{f}_size")
            if size <= 0 or not 0 <= rank < size:
                raise ValueError(f"target layout: field '{f}_rank': {rank} not in [0, {size})")

    @classmethod
    def from_global_rank(cls, global_rank: int, *, tp_size: int, **kw) -> TargetLayout:
        """The TP position of ``global_rank`` in a TP-fastest (Megatron / vLLM) rank order:
        ``tp_rank = global_rank % tp_size``, whatever the PP stage."""
        return cls(tp_size=tp_size, tp_rank=global_rank % tp_size, **kw)

    @property
    def slot(self) -> int:
        return self.ep_rank * self.tp_size + self.tp_rank

    def segments(self, spec: ShardDescriptor) -> list[tuple[int, int]]:
        """Global rows of ``spec`` along its shard axis this receiver holds, in local order:
        Megatron's TP slice of this position."""
        return rank_segments(
            spec, self.tp_size, self.tp_rank, vocab_divisible_by=self.vocab_divisible_by
        )


class Piece(NamedTuple):
    """Rows ``src_rows`` of source ``src_rank``'s shard -> rows ``dst_rows`` of the destination,
    both along ``axis`` in local coordinates; for grouped expert tensors also local expert
    indices along axis 0. ``src_bytes`` / ``dst_bytes`` are ``(offset, length)`` inside the
    shard / destination when that side's box is contiguous, else ``None``."""

    src_rank: int
    name: str
    axis: int
    src_rows: tuple[int, int]
    dst_rows: tuple[int, int]
    src_experts: tuple[int, int] | None = None
    dst_experts: tuple[int, int] | None = None
    src_bytes: tuple[int, int] | None = None
    dst_bytes: tuple[int, int] | None = None

    @property
    def direct(self) -> bool:
        """Both sides contiguous: one transport read straight into the destination view."""
        return self.src_bytes is not None and self.dst_bytes is not None

    def src_view(self, shard: torch.Tensor) -> torch.Tensor:
        return _narrow(shard, self.axis, self.src_rows, self.src_experts)

    def dst_view(self, dest: torch.Tensor) -> torch.Tensor:
        return _narrow(dest, self.axis, self.dst_rows, self.dst_experts)


def _narrow(t: torch.Tensor, axis: int, rows: tuple[int, int], experts) -> torch.Tensor:
    t = t.narrow(axis, rows[0], rows[1] - rows[0])
    return t if experts is None else t.narrow(0, experts[0], experts[1] - experts[0])


def box_bytes(shape: Sequence[int], starts: Sequence[int], sizes: Sequence[int], itemsize: int):
    """``(offset, length)`` of a box in a row-major tensor, or ``None`` when the box is not one
    contiguous span (every dim after the outermost one longer than 1 must be whole)."""
    n, outer = len(shape), 0
    while outer < n and sizes[outer] <= 1:
        outer += 1
    for j in range(outer + 1, n):
        if sizes[j] != shape[j]:
            return None
    offset, length = 0, itemsize
    for j in range(n):
        offset = offset * shape[j] + starts[j]
        length *= sizes[j]
    return offset * itemsize, length


def piece_spans(
    p: Piece, src_shape: Sequence[int], dst_shape: Sequence[int], itemsize: int
) -> list[tuple[int, int, int]]:
    """``(src offset, dst offset, length)`` in bytes of the contiguous spans that make piece
    ``p``: one span when both boxes are contiguous, else one per index of the dims before the
    shard axis (a row-parallel piece: one span per row)."""
    if p.src_bytes is not None and p.dst_bytes is not None:
        return [(p.src_bytes[0], p.dst_bytes[0], p.src_bytes[1])]
    axis = p.axis
    starts_s, starts_d = [0] * len(src_shape), [0] * len(dst_shape)
    starts_s[axis], starts_d[axis] = p.src_rows[0], p.dst_rows[0]
    outer = list(src_shape[:axis])
    if p.src_experts is not None and p.dst_experts is not None:
        starts_s[0], starts_d[0] = p.src_experts[0], p.dst_experts[0]
        outer[0] = p.src_experts[1] - p.src_experts[0]
    inner = (p.src_rows[1] - p.src_rows[0]) * math.prod(src_shape[axis + 1 :]) * itemsize

    def offset(shape, starts, index) -> int:
        flat = 0
        for d, n in enumerate(shape):
            flat = flat * n + starts[d] + (index[d] if d < axis else 0)
        return flat * itemsize

    return [
        (offset(src_shape, starts_s, i), offset(dst_shape, starts_d, i), inner)
        for i in product(*(range(n) for n in outer))
    ]


def merge_adjacent(pieces: Sequence[Piece]) -> list[Piece]:
    """Merge neighbours that are adjacent on both sides (same source, same experts)."""
    out: list[Piece] = []
    for p in pieces:
        q = out[-1] if out else None
        if (
            q is not None
            and (q.src_rank, q.src_experts, q.dst_experts)
            == (p.src_rank, p.src_experts, p.dst_experts)
            and q.src_rows[1] == p.src_rows[0]
            and q.dst_rows[1] == p.dst_rows[0]
        ):
            out[-1] = q._replace(
                src_rows=(q.src_rows[0], p.src_rows[1]), dst_rows=(q.dst_rows[0], p.dst_rows[1])
            )
        else:
            out.append(p)
    return out


@dataclass(slots=True)
class TensorPlan:
    """How one destination tensor is filled. ``spec`` is one source's descriptor, kept for its
    style facts (shape, role, axis, heads); its offset belongs to that source only."""

    name: str
    spec: ShardDescriptor
    dst_shape: tuple[int, ...]
    pieces: list[Piece]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.spec.dtype]

    @property
    def assembly(self) -> str:
        """``direct`` when every piece can be read straight into its destination view,
        ``scratch`` when some side is strided (row-parallel dim-1 slices): pull, then copy."""
        return "direct" if all(p.direct for p in self.pieces) else "scratch"

    @property
    def nbytes(self) -> int:
        return math.prod(self.dst_shape) * self.spec.element_size


class IncompleteRefitPlan(ValueError):
    """A plan with coverage problems was asked to run (fail closed)."""


@dataclass
class RefitPlan:
    target: TargetLayout
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)  # tensor -> reasons

    def require_complete(self) -> RefitPlan:
        if self.missing:
            lines = [f"tensor {n!r}: {r}" for n, rs in self.missing.items() for r in rs]
            more = f" (+{len(lines) - 20} more)" if len(lines) > 20 else ""
            raise IncompleteRefitPlan("refit plan incomplete: " + "; ".join(lines[:20]) + more)
        return self

    def pieces_by_source(self) -> dict[int, list[Piece]]:
        out: dict[int, list[Piece]] = {}
        for t in self.tensors.values():
            for p in t.pieces:
                out.setdefault(p.src_rank, []).append(p)
        return out


# The facts every source of one tensor must agree on (offsets and ranges may differ).
_FACTS = (
    "global_shape",
    "dtype",
    "style",
    "shard_axis",
    "num_heads",
    "num_kv_heads",
    "num_experts",
)


def _disagreement(entries: list[tuple[int, ShardDescriptor]]) -> str | None:
    first = entries[0][1]
    for rank, d in entries[1:]:
        for f in _FACTS:
            if getattr(d, f) != getattr(first, f):
                return (
                    f"field {f!r}: sources disagree ({getattr(first, f)} vs {getattr(d, f)} "
                    f"on rank {rank})"
                )
    return None


@dataclass(frozen=True, slots=True)
class _Held:
    """Global rows ``[lo, hi)`` that source ``key`` holds, starting at its local row ``local``."""

    lo: int
    hi: int
    key: int
    local: int


@dataclass(frozen=True, slots=True)
class _Cut:
    """Local rows ``src`` of source ``key`` fill local rows ``dst`` of the destination."""

    key: int
    src: tuple[int, int]
    dst: tuple[int, int]


def _intersect(want: list[tuple[int, int]], held: list[_Held]) -> tuple[list[_Cut], list]:
    """Cut the wanted global intervals (in destination order) by the sorted source intervals.
    Returns the cuts and the wanted rows no source holds (gaps)."""
    los = [h.lo for h in held]
    cuts: list[_Cut] = []
    gaps: list[tuple[int, int]] = []
    dst_at = 0  # where the current wanted interval starts in the destination
    for lo, hi in want:
        cur, i = lo, max(bisect_right(los, lo) - 1, 0)
        while cur < hi and i < len(held):
            h = held[i]
            if h.lo > cur:
                gaps.append((cur, min(h.lo, hi)))
                cur = min(h.lo, hi)
                continue
            if h.hi > cur:
                end = min(hi, h.hi)
                src = (h.local + cur - h.lo, h.local + end - h.lo)
                cuts.append(_Cut(h.key, src, (dst_at + cur - lo, dst_at + end - lo)))
                cur = end
            i += 1
        if cur < hi:
            gaps.append((cur, hi))
        dst_at += hi - lo
    return cuts, gaps


def _overlaps(held: list[_Held]) -> list[tuple[int, int]]:
    out, reach = [], 0
    for i, h in enumerate(held):
        if i and h.lo < reach:
            out.append((h.lo, min(h.hi, reach)))
        reach = max(reach, h.hi)
    return out


def _held_rows(shards: list[tuple[int, ShardDescriptor]]) -> list[_Held]:
    out = []
    for rank, d in shards:
        at = 0
        for lo, hi in d.segments():
            out.append(_Held(lo, hi, rank, at))
            at += hi - lo
    return sorted(out, key=lambda h: (h.lo, h.hi, h.key))


def _pick_replicas(entries, target: TargetLayout) -> list[tuple[int, ShardDescriptor]]:
    """One source per distinct shard; identical shards (replicas across EP / PP / replicated
    placement) are spread over target ranks instead of all reading from one."""
    groups: dict[tuple, list[tuple[int, ShardDescriptor]]] = {}
    for rank, d in entries:
        groups.setdefault((d.shard_range, d.expert_ids), []).append((rank, d))
    return [g[target.slot % len(g)] for g in groups.values()]


def _row_pieces(name, axis, want, shards, experts=None) -> tuple[list[Piece], list[str]]:
    """Pieces filling the wanted rows from ``shards``; ``experts`` is the (source, destination)
    expert range they all carry, for grouped expert tensors."""
    held = _held_rows(shards)
    cuts, gaps = _intersect(want, held)
    src_e, dst_e = experts or (None, None)
    pieces = [Piece(c.key, name, axis, c.src, c.dst, src_e, dst_e) for c in cuts]
    return pieces, _coverage_reasons(axis, gaps, _overlaps(held))


def _plan_tensor(name, entries, target: TargetLayout) -> tuple[TensorPlan | None, list[str]]:
    spec = entries[0][1]
    if (why := _disagreement(entries)) is not None:
        return None, [why]
    if any(d.placement == "partial" for _, d in entries):
        return None, ["field 'placement': 'partial' needs a reduction; refit moves whole values"]
    try:
        want = target.segments(spec)
        e_want = (
            expert_range(spec.num_experts, target.ep_size, target.ep_rank) if spec.grouped else None
        )
    except ValueError as e:
        return None, [f"field 'style' ({spec.style}): {e}"]
    shards = _pick_replicas(entries, target)
    axis = spec.shard_axis
    pieces: list[Piece] = []
    reasons: list[str] = []
    if e_want is None:
        pieces, reasons = _row_pieces(name, axis, want, shards)
    else:
        # grouped experts: first which source run holds which experts, then rows within each
        runs: dict[tuple[int, int], list[tuple[int, ShardDescriptor]]] = {}
        for rank, d in shards:
            runs.setdefault((d.expert_ids[0], d.expert_ids[0] + len(d.expert_ids)), []).append(
                (rank, d)
            )
        run_keys = sorted(runs)
        held_e = [_Held(lo, hi, i, 0) for i, (lo, hi) in enumerate(run_keys)]
        e_cuts, e_gaps = _intersect([e_want], held_e)
        reasons += [
            f"field 'expert_ids': experts [{a}, {b}) published by no source" for a, b in e_gaps
        ]
        reasons += [
            f"field 'expert_ids': sources overlap on experts [{a}, {b})"
            for a, b in _overlaps(held_e)
        ]
        for ec in e_cuts:
            run_pieces, run_reasons = _row_pieces(
                name, axis, want, runs[run_keys[ec.key]], (ec.src, ec.dst)
            )
            pieces += run_pieces
            reasons += run_reasons
    if reasons:
        return None, reasons
    dst_shape = destination_shape(spec, want, e_want)
    local_shapes = {rank: d.local_shape for rank, d in shards}
    plan_pieces = [
        _with_bytes(p, local_shapes[p.src_rank], dst_shape, spec.element_size)
        for p in merge_adjacent(pieces)
    ]
    return TensorPlan(name, spec, tuple(dst_shape), plan_pieces), []


def destination_shape(
    spec: ShardDescriptor, segments: list[tuple[int, int]], experts: tuple[int, int] | None
) -> tuple[int, ...]:
    """The receiver's local tensor: the global shape with the shard axis cut to the rows its
    segments hold (the last rank's remainder, not the whole axis) and, for grouped experts,
    axis 0 cut to its expert range."""
    shape = list(spec.global_shape)
    shape[spec.shard_axis] = sum(hi - lo for lo, hi in segments)
    if experts is not None:
        shape[0] = experts[1] - experts[0]
    return tuple(shape)


def _coverage_reasons(axis: int, gaps, overlaps) -> list[str]:
    return [
        f"field 'shard_range': rows [{a}, {b}) on axis {axis} published by no source"
        for a, b in gaps
    ] + [
        f"field 'shard_range': sources overlap on rows [{a}, {b}) of axis {axis}"
        for a, b in overlaps
    ]


def _with_bytes(p: Piece, src_shape, dst_shape, itemsize: int) -> Piece:
    def span(shape, rows, experts):
        starts, sizes = [0] * len(shape), list(shape)
        starts[p.axis], sizes[p.axis] = rows[0], rows[1] - rows[0]
        if experts is not None:
            starts[0], sizes[0] = experts[0], experts[1] - experts[0]
        return box_bytes(shape, starts, sizes, itemsize)

    return p._replace(
        src_bytes=span(src_shape, p.src_rows, p.src_experts),
        dst_bytes=span(dst_shape, p.dst_rows, p.dst_experts),
    )


def _check_manifests(manifests: Sequence[SourceManifest]) -> None:
    if not manifests:
        raise ValueError("plan_refit: no source manifests")
    first = manifests[0]
    seen = set()
    for m in manifests:
        for f in ("model_id", "version", "tp_size", "pp_size", "ep_size"):
            if getattr(m, f) != getattr(first, f):
                raise ValueError(
                    f"manifest rank {m.rank}: field {f!r}: {getattr(m, f)!r} != {getattr(first, f)!r}"
                )
        if m.rank in seen:
            raise ValueError(f"manifest rank {m.rank}: field 'tp_rank': published twice")
        seen.add(m.rank)


def plan_refit(
    manifests: Sequence[SourceManifest],
    target: TargetLayout,
    *,
    expected: Mapping[str, str] | None = None,
) -> RefitPlan:
    """Plan this receiver's pulls for one version's manifests.

    ``expected`` (tensor name -> dtype name), when given, is what the receiver needs: names no
    source publishes and dtype mismatches (no silent casts) are reported missing, and only those
    names are planned. Per-expert tensors of experts this receiver does not own are skipped.
    """
    _check_manifests(manifests)
    by_name: dict[str, list[tuple[int, ShardDescriptor]]] = {}
    for m in manifests:
        rank = m.rank
        for d in m.tensors:
            by_name.setdefault(d.name, []).append((rank, d))
    plan = RefitPlan(target)
    for name in expected if expected is not None else by_name:
        entries = by_name.get(name)
        if entries is None:
            plan.missing[name] = ["published by no source"]
            continue
        spec = entries[0][1]
        if expected is not None and expected[name] != spec.dtype:
            plan.missing[name] = [f"field 'dtype': source {spec.dtype}, receiver {expected[name]}"]
            continue
        if spec.per_expert:
            try:
                lo, hi = expert_range(spec.num_experts, target.ep_size, target.ep_rank)
            except ValueError as e:
                plan.missing[name] = [f"field 'num_experts': {e}"]
                continue
            if not lo <= spec.expert_ids[0] < hi:
                continue
        tensor, reasons = _plan_tensor(name, entries, target)
        if reasons:
            plan.missing[name] = reasons
        else:
            assert tensor is not None
            plan.tensors[name] = tensor
    return plan


def assemble(
    plan: RefitPlan, source_shards: Mapping[int, Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Reference data plane in pure torch: fill every destination tensor of a complete plan
    from ``source_shards[src_rank][name]``. Tensors with an empty destination (a vocab rank
    holding only padding) come back empty and have no pieces."""
    plan.require_complete()
    out = {}
    for name, t in plan.tensors.items():
        dest = torch.empty(t.dst_shape, dtype=t.dtype)
        for p in t.pieces:
            p.dst_view(dest).copy_(p.src_view(source_shards[p.src_rank][name]))
        out[name] = dest
    return out


class PlanCache:
    """Plans keyed by (model config, every source's layout signature, target layout).

    One cache per receiver: ``expected`` (its tensor names and dtypes) is fixed for its life.
    Source dtypes, shapes and placements are inside the layout signatures; offsets and version
    numbers are not, so a new version with the same layout reuses the plan.
    """

    def __init__(self, *, expected: Mapping[str, str] | None = None, max_entries: int = 4) -> None:
        self.expected = expected
        self.max_entries = max_entries
        self._plans: OrderedDict[tuple, RefitPlan] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(
        manifests: Sequence[SourceManifest],
        target: TargetLayout,
        model_config: RefitModelConfig | None,
    ) -> tuple:
        sigs = tuple(sorted((m.rank, m.layout_signature) for m in manifests))
        return (model_config.key() if model_config else None, sigs, target)

    def get(
        self,
        manifests: Sequence[SourceManifest],
        target: TargetLayout,
        model_config: RefitModelConfig | None = None,
    ) -> RefitPlan:
        """The cached plan for this key, or a freshly built one (complete or not). A hit still
        checks that the manifests are one version of one publisher set, as ``plan_refit``
        does: a mixed set never rides on a plan cached from a consistent one."""
        _check_manifests(manifests)
        key = self.key(manifests, target, model_config)
        plan = self._plans.get(key)
        if plan is not None:
            self.hits += 1
            self._plans.move_to_end(key)
            return plan
        self.misses += 1
        plan = plan_refit(manifests, target, expected=self.expected)
        self._plans[key] = plan
        if len(self._plans) > self.max_entries:
            self._plans.popitem(last=False)
        return plan
