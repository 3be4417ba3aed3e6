"""Refit straight into a tensor-parallel engine's shards: each rank pulls, verifies and writes
only its own slice of every tensor, with no all-gather of full tensors.

A sharded engine (vLLM, SGLang, TensorRT-LLM, transformers' native TP) holds on each rank a
*local* tensor per parameter: column-parallel rows of q/k/v and gate/up (vLLM fuses each
group into one tensor), row-parallel columns of o_proj/down_proj, vocab rows, replicated norms,
KV heads repeated when TP exceeds them. Its layout is a :data:`LocalLayout`: for every local
tensor, the :class:`SlicePart` s of full HF parameters it is made of, concatenated along their
dim, and the :class:`Padding` rows the engine adds of its own (vLLM pads its vocab to a
multiple of 64 before splitting it, so a rank's last vocab rows may be padding that refit never
writes). :func:`dtensor_layout` reads it off DTensor placements; an engine without DTensors
declares it (:mod:`mx_sim.conformance.adapters` shows vLLM's fused q|k|v).

:class:`ShardTarget` turns a layout into the rows of each canonical Megatron tensor this rank
needs, by translating row *numbers*: canonical tensors whose elements are their own indices go
through the same Megatron -> HF translation as the weights, and the index each local element
receives says which canonical row it is. No second copy of the layout rules exists, so the
target cannot drift from the translation. The planner then plans those rows like any other
target (:meth:`~mx_reference.refit.planner.TargetLayout.segments`).

:class:`ShardedRefitReceiver` runs the same cycle as :class:`RefitReceiver`, with three steps
replaced: pieces are pulled as contiguous spans straight into the destination arena (a strided
piece costs descriptors, never extra bytes), translation is a set of runs from that arena into
each local tensor (:class:`~mx_reference.refit.layouts.Pieced`), and verification is one
all-reduce of position checksums (:func:`~mx_reference.refit.wire.box_checksum`): the replica
proves it holds together exactly the published bytes, each row counted by its lowest rank.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mx_reference.refit.apply import check_staged, model_parameters
from mx_reference.refit.gather import all_gather_shards
from mx_reference.refit.layouts import (
    Pieced,
    Staged,
    canonical_shapes,
    hf_from_canonical,
    hf_meta,
)
from mx_reference.refit.name_maps import RefitModelConfig, tensor_rules
from mx_reference.refit.planner import Piece, RefitPlan, TargetLayout, TensorPlan
from mx_reference.refit.receiver import RefitError, RefitReceiver
from mx_reference.refit.wire import (
    CHECKSUM_MASK,
    ShardDescriptor,
    SourceManifest,
    box_checksum,
)

Rows = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class SlicePart:
    """Rows ``[start, stop)`` along ``dim`` of the full HF parameter ``hf_name``."""

    hf_name: str
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Padding:
    """``rows`` rows along ``dim`` of a local tensor that are no HF parameter's: the engine's
    own padding (vLLM's vocab padding). Refit leaves them as they are."""

    dim: int
    rows: int


LayoutPart = SlicePart | Padding
LocalLayout = Mapping[str, Sequence[LayoutPart]]  # local tensor name -> parts, in local order


def chunk_range(extent: int, size: int, rank: int) -> tuple[int, int]:
    """Rows of ``torch.chunk`` (a DTensor ``Shard``) on rank ``rank`` of ``size``: chunks of
    ``ceil(extent / size)``, the last ones shorter or empty."""
    step = -(-extent // size)
    lo = min(rank * step, extent)
    return lo, min(lo + step, extent)


def dtensor_layout(
    model: torch.nn.Module,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[SlicePart, ...]]]:
    """Local tensors and their layout, read off ``model``'s parameters: a DTensor on a 1-D mesh
    is its ``to_local()`` cut by its placement (``Shard``, vLLM-style packed ``_StridedShard``,
    ``Replicate``), a plain parameter is whole. ``ValueError`` for a placement refit cannot
    write (``Partial`` sums, meshes of more than one dim)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    local: dict[str, torch.Tensor] = {}
    layout: dict[str, tuple[SlicePart, ...]] = {}
    for name, p in model_parameters(model).items():
        shape = tuple(p.shape)
        if not isinstance(p, DTensor):
            local[name], layout[name] = p, (SlicePart(name, 0, 0, shape[0]),)
            continue
        mesh, placements = p.device_mesh, p.placements
        if mesh.ndim != 1 or isinstance(placements[0], Partial):
            raise ValueError(
                f"{name}: field 'placement': {placements} on a {mesh.ndim}-d mesh; refit writes "
                "Shard or Replicate placements of a 1-d mesh"
            )
        placement, size, rank = placements[0], mesh.size(), mesh.get_local_rank()
        if isinstance(placement, Replicate):
            parts = [SlicePart(name, 0, 0, shape[0])]
        elif isinstance(placement, _StridedShard):  # packed [gate; up]: each block sharded
            dim, blocks = placement.dim % len(shape), placement.split_factor
            block = shape[dim] // blocks
            lo, hi = chunk_range(block, size, rank)
            parts = [SlicePart(name, dim, b * block + lo, b * block + hi) for b in range(blocks)]
        elif isinstance(placement, Shard):
            dim = placement.dim % len(shape)
            parts = [SlicePart(name, dim, *chunk_range(shape[dim], size, rank))]
        else:
            raise ValueError(f"{name}: field 'placement': unknown placement {placement}")
        local[name], layout[name] = p.to_local(), tuple(parts)
    return local, layout


# ---- the target: which canonical rows feed which local rows ------------------------------------

_TAG = 2**24  # row numbers travel as tag * _TAG + row in float64: exact below 2**53


@dataclass(frozen=True)
class Run:
    """Local rows ``[start, start + length)`` along ``dim`` of local tensor ``local`` (of its
    expert ``expert`` when it stacks experts) are canonical rows ``[canon, canon + length)``
    of Megatron tensor ``megatron`` along its shard axis."""

    local: str
    expert: int | None
    dim: int
    start: int
    length: int
    megatron: str
    canon: int


def _runs_of(values: torch.Tensor, names: Sequence[str]) -> list[tuple[int, int, str, int]]:
    """``(position, length, megatron name, first canonical row)`` of each run of consecutive
    rows of one tensor in a vector of translated row numbers."""
    v = values.to(torch.int64)
    tags, rows = (v // _TAG).tolist(), (v % _TAG).tolist()
    out: list[tuple[int, int, str, int]] = []
    for i, (tag, row) in enumerate(zip(tags, rows, strict=True)):
        if out and out[-1][2] == names[tag] and out[-1][3] + out[-1][1] == row:
            pos, n, m, c = out[-1]
            out[-1] = (pos, n + 1, m, c)
        else:
            out.append((i, 1, names[tag], row))
    return out


def _merge(intervals: list[tuple[int, int]]) -> Rows:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


@dataclass(frozen=True)
class ShardTarget(TargetLayout):
    """A receiver position whose wanted rows come from its engine's layout, not from
    Megatron's TP slicing. ``tp_rank``/``tp_size`` still say where it sits in its replica."""

    wanted: tuple[tuple[str, int, Rows], ...] = ()  # megatron name, shard axis, global rows
    runs: tuple[Run, ...] = field(default=(), compare=False, hash=False)

    @functools.cached_property
    def by_name(self) -> dict[str, tuple[int, Rows]]:
        """``wanted`` by Megatron name: (shard axis, rows); built once, read per tensor."""
        return {name: (axis, rows) for name, axis, rows in self.wanted}

    def segments(self, spec: ShardDescriptor) -> list[tuple[int, int]]:
        axis, rows = self.by_name[spec.name]
        if spec.shard_axis != axis:
            raise ValueError(
                f"the engine holds rows along axis {axis}, the sources split axis {spec.shard_axis}"
            )
        return list(rows)

    @classmethod
    def build(
        cls,
        layout: LocalLayout,
        local_shapes: Mapping[str, tuple[int, ...]],
        meta: Mapping[str, torch.Tensor],
        cfg: RefitModelConfig,
        *,
        position: TargetLayout,
        expert_layout: str = "per_expert",
    ) -> ShardTarget:
        """The target of ``layout`` (local tensors of ``local_shapes``) for a model whose full
        HF parameters are ``meta`` (:func:`~mx_reference.refit.layouts.hf_meta`). Raises
        ``ValueError`` naming the tensor and part for a layout no plan can serve: a part on a
        dim the sources never split, a query/KV slice that cuts a head, a part outside its
        parameter, parts that do not add up to the local shape."""
        rules = tensor_rules(cfg, expert_layout)
        shapes = canonical_shapes(meta, cfg, expert_layout)
        names = [r.megatron for r in rules]
        index = {}
        for tag, rule in enumerate(rules):  # canonical tensors holding their own row numbers
            view = [1] * len(shapes[rule.megatron])
            view[rule.axis] = shapes[rule.megatron][rule.axis]
            rows = torch.arange(view[rule.axis], dtype=torch.float64) + tag * _TAG
            index[rule.megatron] = rows.view(view)
        hf = hf_from_canonical(index, cfg, expert_layout)
        axes = {r.megatron: r.axis for r in rules}
        head_rows = {
            r.megatron: shapes[r.megatron][0] // (cfg.num_heads + 2 * cfg.num_kv_heads)
            for r in rules
            if r.style == "qkv_column"
        }
        runs: list[Run] = []
        for local_name, parts in layout.items():
            at = 0
            for part in parts:
                where = f"local tensor {local_name!r}: part {part}"
                if isinstance(part, Padding):
                    if part.rows <= 0:
                        raise ValueError(f"{where}: field 'rows': {part.rows} is not positive")
                    if part.dim != parts[0].dim:
                        raise ValueError(
                            f"{where}: field 'dim': padding along dim {part.dim}, the parts "
                            f"are concatenated along dim {parts[0].dim}"
                        )
                    at += part.rows
                    continue
                if part.hf_name not in meta:
                    raise ValueError(f"{where}: field 'hf_name': no such HF parameter")
                full = tuple(meta[part.hf_name].shape)
                inside = 0 <= part.dim < len(full) and 0 <= part.start < part.stop <= full[part.dim]
                if not inside:
                    raise ValueError(f"{where}: field 'stop': outside the parameter's {full}")
                part_runs = _part_runs(local_name, part, full, at, hf[part.hf_name], names, where)
                for run in part_runs:
                    _check_run(run, full, shapes, axes, head_rows)
                runs += part_runs
                at += part.stop - part.start
            _check_local_shape(local_name, parts, at, local_shapes[local_name], meta)
        wanted: dict[str, list[tuple[int, int]]] = {}
        for run in runs:
            wanted.setdefault(run.megatron, []).append((run.canon, run.canon + run.length))
        return cls(
            tp_size=position.tp_size,
            tp_rank=position.tp_rank,
            vocab_divisible_by=position.vocab_divisible_by,
            wanted=tuple((m, axes[m], _merge(rows)) for m, rows in sorted(wanted.items())),
            runs=tuple(runs),
        )


def _part_runs(
    local: str,
    part: SlicePart,
    shape: tuple[int, ...],
    at: int,
    numbers: torch.Tensor,
    names: list[str],
    where: str,
) -> list[Run]:
    """The runs of one part (of a parameter of ``shape``) placed at local row ``at``.
    ``numbers`` is the parameter's translated row numbers (size 1 along the dims they do not
    vary on); a parameter that stacks experts (one Megatron tensor each) on dim 0 is cut
    expert by expert."""
    whole = part.stop - part.start == shape[part.dim]
    if numbers.dim() == 3 and numbers.shape[0] > 1:
        if part.dim == 0:  # whole experts
            return [
                run
                for e in range(part.start, part.stop)
                for run in _block_runs(
                    local, at + e - part.start, numbers[e], None, True, 0, names, where
                )
            ]
        inner = SlicePart(part.hf_name, part.dim - 1, part.start, part.stop)
        return [
            run
            for e in range(numbers.shape[0])
            for run in _block_runs(local, e, numbers[e], inner, whole, at, names, where)
        ]
    return _block_runs(local, None, numbers, part, whole, at, names, where)


def _block_runs(
    local: str,
    expert: int | None,
    block: torch.Tensor,
    part: SlicePart | None,
    whole: bool,
    at: int,
    names: list[str],
    where: str,
) -> list[Run]:
    """Runs of one Megatron tensor's HF image ``block`` (its row numbers vary along one dim,
    the shard axis) cut by ``part`` (``None``, or ``whole``: all of it)."""
    (axis,) = [d for d in range(block.dim()) if block.shape[d] > 1] or [0]
    if part is not None and part.dim != axis and not whole:
        raise ValueError(
            f"{where}: field 'dim': the sources split this parameter along dim "
            f"{axis + (expert is not None)}, not {part.dim + (expert is not None)}; no plan "
            "covers the slice"
        )
    if part is not None and part.dim == axis:
        lo, hi, first = part.start, part.stop, at
    elif at:
        raise ValueError(f"{where}: field 'dim': parts concatenated across the rows they hold")
    else:
        lo, hi, first = 0, block.shape[axis], 0
    dim = axis + (expert is not None)  # in the local tensor
    return [
        Run(local, expert, dim, first + pos, n, megatron, canon)
        for pos, n, megatron, canon in _runs_of(block.reshape(-1)[lo:hi], names)
    ]


def _check_local_shape(
    name: str,
    parts: Sequence[LayoutPart],
    rows: int,
    local_shape: tuple[int, ...],
    meta: Mapping[str, torch.Tensor],
) -> None:
    sliced = [p for p in parts if isinstance(p, SlicePart)]
    if not sliced:
        raise ValueError(f"local tensor {name!r}: field 'parts': padding only, no HF parameter")
    full = list(meta[sliced[0].hf_name].shape)
    full[sliced[0].dim] = rows
    if tuple(full) != tuple(local_shape):
        raise ValueError(
            f"local tensor {name!r}: field 'shape': the declared parts {list(parts)} make "
            f"{tuple(full)}, the engine holds {tuple(local_shape)}"
        )


def _check_run(run: Run, hf_shape: tuple[int, ...], shapes, axes, head_rows) -> None:
    """A run copies a block of the same shape, and a q/k/v run holds whole heads."""
    d = head_rows.get(run.megatron)
    if d and (run.canon % d or run.length % d):
        raise ValueError(
            f"local tensor {run.local!r}: field 'placement': rows [{run.canon}, "
            f"{run.canon + run.length}) of {run.megatron} cut a head of {d} rows; the mesh "
            "size must divide the heads"
        )
    canonical = list(shapes[run.megatron])
    canonical[axes[run.megatron]] = run.length
    hf = list(hf_shape[1:] if run.expert is not None else hf_shape)
    hf[run.dim - (run.expert is not None)] = run.length
    if hf != canonical:
        raise ValueError(
            f"local tensor {run.local!r}: field 'hf_name': stored as {tuple(hf)} against "
            f"Megatron's {tuple(canonical)} (transposed); sharded refit copies rows as they are"
        )


def _position(rows: Rows, row: int) -> int:
    """Where global row ``row`` sits in the concatenation of ``rows``."""
    at = 0
    for lo, hi in rows:
        if lo <= row < hi:
            return at + row - lo
        at += hi - lo
    raise AssertionError(f"row {row} not in {rows}")


def _subtract(rows: Rows, other: Rows) -> Rows:
    """``rows`` without ``other`` (both sorted and disjoint)."""
    out = []
    for lo, hi in rows:
        cur = lo
        for olo, ohi in other:
            if ohi <= cur or olo >= hi:
                continue
            if olo > cur:
                out.append((cur, olo))
            cur = max(cur, ohi)
        if cur < hi:
            out.append((cur, hi))
    return tuple(out)


def published_checksums(manifests: Sequence[SourceManifest], names: Sequence[str]) -> list[int]:
    """Per tensor name, the sum of its distinct published shards' checksums (replicas of one
    shard, across DP/PP/EP, count once and must agree)."""
    shards: dict[tuple, int] = {}
    for m in manifests:
        for d in m.tensors:
            if d.checksum is None:
                raise RefitError(
                    f"{d.name}: source rank {m.rank} publishes no checksum; a sharded "
                    "receiver verifies by checksum"
                )
            key = (d.name, d.shard_range, d.expert_ids)
            if shards.setdefault(key, d.checksum) != d.checksum:
                raise RefitError(f"{d.name}: replicas of shard {d.shard_range} disagree")
    total = dict.fromkeys(names, 0)
    for (name, _, _), checksum in shards.items():
        if name not in total:
            raise RefitError(f"{name}: published, but this model has no such tensor")
        total[name] = (total[name] + checksum) & CHECKSUM_MASK
    return [total[n] for n in names]


# ---- the receiver ---------------------------------------------------------------------------------


class ShardedRefitReceiver(RefitReceiver):
    """A :class:`RefitReceiver` for an engine that holds only its shard.

    ``layout`` and ``local`` (local tensors by the layout's names) default to what
    :func:`dtensor_layout` reads off ``model``; an engine without DTensors passes both, and
    ``meta`` (its full HF parameters as meta tensors, e.g. from the HF model built on the meta
    device) when ``model`` does not carry HF names. ``group`` is the replica; together its
    ranks must hold every published tensor. Strided pieces are pulled as exact spans, or, when
    a span is shorter than ``min_span_bytes``, as their whole source shard into scratch (fewer
    descriptors, more bytes). Warm cycles register and allocate nothing.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layout: LocalLayout | None = None,
        local: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, torch.Tensor] | None = None,
        min_span_bytes: int = 0,
        **kw: Any,
    ):
        self.min_span_bytes = min_span_bytes
        if layout is None or local is None:
            local, layout = dtensor_layout(model)
        meta = hf_meta(model) if meta is None else meta
        super().__init__(model, meta=meta, **kw)
        self.params = dict(local)
        self.target = self.shard_target = ShardTarget.build(
            layout,
            {n: tuple(t.shape) for n, t in local.items()},
            meta,
            self.model_config,
            position=self.target,
            expert_layout=self.config.expert_layout,
        )
        rows = self.shard_target.by_name
        self.plans.expected = {m: d for m, d in (self.plans.expected or {}).items() if m in rows}
        self._claims: dict[str, Rows] | None = None

    # -- the seams, sharded -------------------------------------------------------------------

    def _via_scratch(self, p: Piece, t: TensorPlan) -> bool:
        """Strided pieces are pulled as their contiguous spans: a rank pulls exactly its
        shard bytes, at one descriptor per row of a row-parallel piece, unless those spans
        are shorter than ``min_span_bytes`` (then the whole source shard goes to scratch)."""
        if p.direct or not self.min_span_bytes:
            return False
        src_cols = p.src_rows[1] - p.src_rows[0]
        row = src_cols * math.prod(t.dst_shape[p.axis + 1 :]) * t.spec.element_size
        return row < self.min_span_bytes

    def translate(self, canonical: Mapping[str, torch.Tensor]) -> dict[str, Staged]:
        """Each local tensor as runs out of the pulled rows: ``canonical`` holds, per Megatron
        tensor, this rank's wanted rows in order (views; apply makes the copies)."""
        rows = self.shard_target.by_name
        runs: dict[str, list[tuple[int | None, int, int, torch.Tensor]]] = {}
        for run in self.shard_target.runs:
            axis, wanted = rows[run.megatron]
            source = canonical[run.megatron].narrow(axis, _position(wanted, run.canon), run.length)
            dim = run.dim - (run.expert is not None)
            runs.setdefault(run.local, []).append((run.expert, dim, run.start, source))
        return {name: Pieced(self.params[name].shape, tuple(r)) for name, r in runs.items()}

    def verify(
        self,
        manifests: Sequence[SourceManifest],
        canonical: Mapping[str, torch.Tensor],
        tensors: Mapping[str, torch.Tensor],
    ) -> None:
        """The replica's rows, each counted once (by its lowest rank), checksum to exactly
        what the publishers announced: one all-reduce of one number per tensor. Checksums
        signed later are waited for after that."""
        names = sorted(self.global_shapes)
        rows = self.shard_target.by_name
        got = torch.zeros(len(names), dtype=torch.int64)
        for i, name in enumerate(names):
            for lo, hi in self._claimed().get(name, ()):
                axis, wanted = rows[name]
                block = canonical[name].narrow(axis, _position(wanted, lo), hi - lo)
                starts = [0] * block.dim()
                starts[axis] = lo
                got[i] += box_checksum(block, self.global_shapes[name], tuple(starts))
        got &= CHECKSUM_MASK  # each entry below 2**32: the sum over ranks stays in int64
        if self.group is not None:
            self.group.allreduce([got]).wait()
            got &= CHECKSUM_MASK
        expected = published_checksums([self.registry.signed(m) for m in manifests], names)
        for i, name in enumerate(names):
            if int(got[i]) != expected[i]:
                raise RefitError(
                    f"{name}: content checksum mismatch between the replica's rows and the "
                    f"sources' shards (v{manifests[0].version}): corrupted, stale or missing bytes"
                )
        check_staged(self.params, tensors)

    # -- private ------------------------------------------------------------------------------

    def _gather(
        self, plan: RefitPlan, local: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return dict(local)  # nothing crosses ranks: every rank applies only its own rows

    def _claimed(self) -> dict[str, Rows]:
        """This rank's rows minus those of every lower rank of the replica (gathered once)."""
        if self._claims is None:
            names = sorted(self.global_shapes)
            ids = {name: i for i, name in enumerate(names)}
            mine = [(ids[m], lo, hi) for m, _, rows in self.shard_target.wanted for lo, hi in rows]
            encoded = {"rows": torch.tensor(mine, dtype=torch.int64).view(-1, 3)}
            rank = 0 if self.group is None else self.group.rank()
            gathered = all_gather_shards(rank, encoded, self.group)
            lower: dict[str, list[tuple[int, int]]] = {}
            for tag, tensors in gathered:
                if tag < rank:
                    for i, lo, hi in tensors["rows"].tolist():
                        lower.setdefault(names[i], []).append((lo, hi))
            self._claims = {
                m: _subtract(rows, _merge(lower.get(m, [])))
                for m, _, rows in self.shard_target.wanted
            }
        return self._claims
