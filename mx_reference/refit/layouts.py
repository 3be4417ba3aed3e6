"""Megatron <-> HF layout translation, both directions, exact inverses.

Every Megatron tensor has a *canonical* global form that does not depend on the TP size: the
QKV weight interleaved per query group ``[q heads of g; k_g; v_g]``, fc1 as ``[gate; up]``, the
embedding and output layer truncated to the real vocab. A TP rank's shard is cut from that form
by TP style (:func:`rank_segments` says which global rows, in local order), and the receiver
merges its ranks' shards back into it. Which HF tensors make which Megatron tensor is in
:mod:`~mx_reference.refit.name_maps`; the transforms a rule asks for (GPT-2's Conv1D transpose,
a fused HF ``q|k|v`` split by head counts) happen here, on the way in and out. Translation back
to HF returns :class:`StagedTensors`, views of the pulled bytes where it can; nothing here
writes into a model (that is :mod:`~mx_reference.refit.apply`).

Notation: H query heads, G KV heads (query groups), p = H/G, D head dim, I FFN size, E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial

import msgspec
import torch

from mx_reference.refit.name_maps import (
    LM_HEAD,
    WORD_EMBEDDINGS,
    RefitModelConfig,
    TensorRule,
    tensor_rules,
)
from mx_reference.refit.name_maps import megatron_name_map as megatron_name_map  # re-export
from mx_reference.refit.wire import (
    EXPERT_STYLES,
    GATED_STYLES,
    ShardDescriptor,
    dtype_name,
    gated_segments,
)


@dataclass(frozen=True)
class Regrouped:
    """``source.reshape(shape)``, not yet made: the tensor of ``shape`` whose elements, in
    row-major order, are those of ``source``.

    Megatron's QKV de-interleaves into q, k and v whose rows are strided per query group: no
    view in HF shape ``[H·D, in]``, but a view as ``[G, p·D, in]``. Copying that view into
    ``param.view(G, p·D, in)`` is the whole de-interleave.
    """

    source: torch.Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        assert self.source.numel() == self.shape.numel(), (self.source.shape, self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    @property
    def device(self) -> torch.device:
        return self.source.device

    def to(self, device: torch.device) -> Regrouped:
        return Regrouped(self.source.to(device), self.shape)

    def materialize(self) -> torch.Tensor:
        return self.source.reshape(self.shape)

    def copy_into(self, dst: torch.Tensor) -> None:
        if dst.is_contiguous():
            dst.view(self.source.shape).copy_(self.source)
        else:
            dst.copy_(self.materialize())


@dataclass(frozen=True)
class Pieced:
    """A local shard of ``shape`` not yet made, filled run by run: each ``(expert, dim, start,
    source)`` copies ``source`` into ``dest[expert].narrow(dim, start, len)`` (``dest`` itself
    when ``expert`` is ``None``). A tensor-parallel rank's q, for one, is a run of each query
    group's rows of the pulled QKV; gate_up is a run of gate rows and one of up rows. Rows no
    run covers (an engine's padding) are never written, and zero when materialized."""

    shape: torch.Size
    runs: tuple[tuple[int | None, int, int, torch.Tensor], ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.runs[0][3].dtype

    @property
    def device(self) -> torch.device:
        return self.runs[0][3].device

    def to(self, device: torch.device) -> Pieced:
        return Pieced(self.shape, tuple((e, d, s, t.to(device)) for e, d, s, t in self.runs))

    def materialize(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.copy_into(out)
        return out

    def copy_into(self, dst: torch.Tensor) -> None:
        for expert, dim, start, source in self.runs:
            block = dst if expert is None else dst[expert]
            block.narrow(dim, start, source.shape[dim]).copy_(source)


Staged = torch.Tensor | Regrouped | Pieced  # one staged tensor: made, or to be made on apply


class StagedTensors(Mapping[str, torch.Tensor]):
    """A staged version's HF tensors by parameter name. ``entries`` may hold
    :class:`Regrouped` tensors: :func:`apply_in_place` copies them straight into their
    parameters, while reading one through the mapping materializes it."""

    def __init__(self, entries: Mapping[str, Staged]):
        self.entries = dict(entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        return entry.materialize() if isinstance(entry, (Regrouped, Pieced)) else entry

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


# ---- extents ----------------------------------------------------------------------------------


def tp_range(extent: int, tp: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an axis of ``extent`` that TP rank ``rank`` of ``tp`` holds.

    ``per = extent // tp``; the last rank takes the remainder (not the whole axis).
    """
    if tp <= 0 or not 0 <= rank < tp:
        raise ValueError(f"tp rank {rank} not in [0, {tp})")
    per = extent // tp
    return rank * per, extent if rank == tp - 1 else (rank + 1) * per


def padded_vocab_size(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocab: the smallest multiple of ``divisible_by * tp`` >= ``vocab``."""
    step = divisible_by * tp
    return -(-vocab // step) * step


def vocab_range(vocab: int, tp: int, rank: int, divisible_by: int = 128) -> tuple[int, int]:
    """Real (unpadded) vocab rows of rank ``rank``: padding sits on the last rank(s), which may
    hold no real row at all (then ``lo == hi``)."""
    lo, hi = tp_range(padded_vocab_size(vocab, tp, divisible_by), tp, rank)
    return min(lo, vocab), min(hi, vocab)


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """Global expert ids ``[lo, hi)`` on EP rank ``ep_rank`` (linear placement)."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} not divisible by ep_size={ep_size}")
    return tp_range(num_experts, ep_size, ep_rank)


def global_expert_id(local_id: int, *, ep_rank: int, num_experts: int, ep_size: int) -> int:
    """``gid = ep_rank * (E / ep_size) + local_id``."""
    lo, hi = expert_range(num_experts, ep_size, ep_rank)
    if not 0 <= local_id < hi - lo:
        raise ValueError(f"local expert id {local_id} not in [0, {hi - lo})")
    return lo + local_id


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")


def qkv_segments(
    extent: int, tp: int, rank: int, *, num_heads: int, num_kv_heads: int
) -> list[tuple[int, int]]:
    """Rows of the interleaved QKV tensor that TP rank ``rank`` holds, in local order.

    With G divisible by ``tp`` a rank owns whole groups: one contiguous range. With more ranks
    than KV heads (tp divisible by G) each rank holds H/tp query heads of group
    ``rank // (tp/G)`` plus that group's k and v, which ``tp/G`` ranks share; its local tensor
    is again an interleave, of one group.
    """
    h, g = num_heads, num_kv_heads
    _check_heads(h, g)
    if extent % (h + 2 * g):
        raise ValueError(f"QKV extent {extent} is not a multiple of H+2G={h + 2 * g}")
    if g % tp == 0:
        return [tp_range(extent, tp, rank)]
    if tp % g or h % tp:
        raise ValueError(
            f"tp={tp} must divide num_kv_heads={g}, or be a multiple of it "
            f"that divides num_heads={h}"
        )
    d, p = extent // (h + 2 * g), h // g
    reps, qh = tp // g, h // tp
    base = (rank // reps) * (p + 2) * d
    j = rank % reps
    return [(base + j * qh * d, base + (j + 1) * qh * d), (base + p * d, base + (p + 2) * d)]


def rank_segments(
    d: ShardDescriptor, tp: int, rank: int, *, vocab_divisible_by: int = 128
) -> list[tuple[int, int]]:
    """Global rows along ``d.shard_axis`` that rank ``rank`` of ``tp`` holds of tensor ``d``."""
    extent = d.global_shape[d.shard_axis]
    if d.style == "replicated":
        return [(0, extent)]
    if d.style == "qkv_column":
        return qkv_segments(extent, tp, rank, num_heads=d.num_heads, num_kv_heads=d.num_kv_heads)
    if d.style in GATED_STYLES:
        return gated_segments(extent, *tp_range(extent // 2, tp, rank))
    if d.style == "vocab_parallel":
        lo, hi = vocab_range(extent, tp, rank, vocab_divisible_by)
    else:
        lo, hi = tp_range(extent, tp, rank)
    return [(lo, hi)] if hi > lo else []


# ---- fused tensors ----------------------------------------------------------------------------


def megatron_qkv_from_hf(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int, num_kv_heads: int
) -> torch.Tensor:
    """HF ``q_proj``/``k_proj``/``v_proj`` (weights or biases) -> Megatron ``linear_qkv``,
    interleaved per query group; a plain ``cat`` is wrong whenever G > 1."""
    h, g = num_heads, num_kv_heads
    _check_heads(h, g)
    if q.shape[0] % h or k.shape != v.shape or k.shape[0] * h != q.shape[0] * g:
        raise ValueError(
            f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} do "
            f"not fit num_heads={h}, num_kv_heads={g}"
        )
    d, rest = q.shape[0] // h, q.shape[1:]
    groups = [q.reshape(g, (h // g) * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(groups, dim=1).reshape((h + 2 * g) * d, *rest)  # [(H+2G)·D, ...]


def hf_qkv_groups_from_megatron(
    qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)`` of Megatron's ``linear_qkv`` grouped per query group, as views of ``qkv``:
    ``[G, p·D, ...]``, ``[G, D, ...]``, ``[G, D, ...]``."""
    h, g = num_heads, num_kv_heads
    _check_heads(h, g)
    if qkv.shape[0] % (h + 2 * g):
        raise ValueError(f"linear_qkv rows {qkv.shape[0]} not a multiple of H+2G={h + 2 * g}")
    d, p = qkv.shape[0] // (h + 2 * g), h // g
    x = qkv.reshape(g, (p + 2) * d, *qkv.shape[1:])  # [G, (p+2)·D, ...]
    return x[:, : p * d], x[:, p * d : (p + 1) * d], x[:, (p + 1) * d :]


def hf_qkv_from_megatron(
    qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`megatron_qkv_from_hf`: ``(q, k, v)``."""
    q, k, v = hf_qkv_groups_from_megatron(qkv, num_heads=num_heads, num_kv_heads=num_kv_heads)
    return q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)


def split_fused_qkv(
    qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's fused ``q|k|v`` (GPT-2's ``c_attn`` once in ``[out, in]`` order) -> ``(q, k, v)``:
    H·D, G·D and G·D rows one after the other, *not* interleaved per group."""
    h, g = num_heads, num_kv_heads
    _check_heads(h, g)
    if qkv.shape[0] % (h + 2 * g):
        raise ValueError(f"fused q|k|v rows {qkv.shape[0]} not a multiple of H+2G={h + 2 * g}")
    d = qkv.shape[0] // (h + 2 * g)
    q, k, v = qkv.split([h * d, g * d, g * d])
    return q, k, v


def megatron_fc1_shards_from_hf(
    gate: torch.Tensor, up: torch.Tensor, *, tp: int, dim: int = 0
) -> list[torch.Tensor]:
    """Megatron's per-rank fc1 shards ``[gate_r; up_r]`` along ``dim``, one per TP rank."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    ranges = [tp_range(gate.shape[dim], tp, r) for r in range(tp)]
    return [
        torch.cat([gate.narrow(dim, lo, hi - lo), up.narrow(dim, lo, hi - lo)], dim=dim)
        for lo, hi in ranges
    ]


def hf_gate_up_from_megatron(
    shards: list[torch.Tensor], *, dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate, up)`` from per-rank ``[gate_r; up_r]`` shards in TP order.

    Each shard is split in half on its own; halving the concatenation of all shards would
    interleave ranks' gate and up rows whenever TP > 1.
    """
    halves = []
    for r, s in enumerate(shards):
        if s.shape[dim] % 2:
            raise ValueError(f"fc1 shard {r} has an odd extent {s.shape[dim]} on dim {dim}")
        halves.append(s.chunk(2, dim=dim))
    return (torch.cat([g for g, _ in halves], dim=dim), torch.cat([u for _, u in halves], dim=dim))


# ---- canonical form <-> HF, canonical form <-> rank shards -----------------------------------


def canonical_from_hf(
    rule: TensorRule, hf: Mapping[str, torch.Tensor], cfg: RefitModelConfig
) -> torch.Tensor:
    """The canonical global Megatron tensor of ``rule`` built from HF tensors."""
    try:
        parts = [hf[n] if rule.expert is None else hf[n][rule.expert] for n in rule.hf]
    except KeyError as e:
        raise ValueError(f"tensor {rule.megatron!r}: HF state dict lacks {e.args[0]!r}") from None
    if rule.transpose:
        parts = [p.t() for p in parts]  # Conv1D [in, out] -> [out, in]
    if rule.style == "qkv_column":
        if len(parts) == 1:
            parts = list(
                split_fused_qkv(parts[0], num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
            )
        return megatron_qkv_from_hf(*parts, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
    if rule.style == "gated_mlp_column":
        return torch.cat(parts)  # [gate; up]
    return parts[0]  # HF's fused expert gate_up_proj is already [gate; up] per expert


def hf_from_rule(
    rule: TensorRule, t: torch.Tensor, cfg: RefitModelConfig
) -> tuple[torch.Tensor | Regrouped, ...]:
    """Inverse of :func:`canonical_from_hf` for a non-expert rule: its HF tensors in
    ``rule.hf`` order. Separate q, k and v come back :class:`Regrouped` views of ``t``."""
    parts: tuple[torch.Tensor, ...]
    if rule.style == "qkv_column":
        groups = hf_qkv_groups_from_megatron(
            t, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads
        )
        if len(rule.hf) == 3:
            assert not rule.transpose, rule  # no model stores separate q, k, v transposed
            rest = t.shape[1:]
            return tuple(Regrouped(g, torch.Size((g.shape[0] * g.shape[1], *rest))) for g in groups)
        parts = (torch.cat([g.flatten(0, 1) for g in groups]),)  # HF's fused q|k|v
    elif rule.style == "gated_mlp_column" and len(rule.hf) == 2:
        parts = tuple(t.chunk(2))  # canonical is the TP-1 layout [gate; up]
    else:
        parts = (t,)
    if rule.transpose:
        parts = tuple(p.t() for p in parts)  # [out, in] -> Conv1D [in, out]
    return parts


def shard_pieces(
    d: ShardDescriptor, full: torch.Tensor, tp: int, rank: int, *, vocab_divisible_by: int = 128
) -> list[torch.Tensor]:
    """Rank ``rank``'s Megatron shard of the canonical tensor ``full`` (spec ``d``) as views of
    ``full``, in order: concatenated along ``d.shard_axis`` they are the shard."""
    segs = rank_segments(d, tp, rank, vocab_divisible_by=vocab_divisible_by) or [(0, 0)]
    return [full.narrow(d.shard_axis, lo, hi - lo) for lo, hi in segs]


def shard_from_canonical(
    d: ShardDescriptor, full: torch.Tensor, tp: int, rank: int, *, vocab_divisible_by: int = 128
) -> torch.Tensor:
    """Rank ``rank``'s Megatron shard of the canonical tensor ``full`` (spec ``d``)."""
    pieces = shard_pieces(d, full, tp, rank, vocab_divisible_by=vocab_divisible_by)
    return torch.cat(pieces, d.shard_axis)


def canonical_from_shards(
    d: ShardDescriptor, shards: list[torch.Tensor], *, vocab_divisible_by: int = 128
) -> torch.Tensor:
    """Merge every rank's shard (TP order) back into the canonical tensor; inverse of
    :func:`shard_from_canonical`."""
    axis, tp = d.shard_axis, len(shards)
    if d.style in GATED_STYLES:
        return torch.cat(hf_gate_up_from_megatron(shards, dim=axis), dim=axis)
    if d.style == "replicated":
        return shards[0]
    shape = list(shards[0].shape)  # grouped: this EP rank's experts only
    shape[axis] = d.global_shape[axis]
    full = shards[0].new_empty(shape)
    for rank, shard in enumerate(shards):
        at = 0
        for lo, hi in rank_segments(d, tp, rank, vocab_divisible_by=vocab_divisible_by):
            full.narrow(axis, lo, hi - lo).copy_(shard.narrow(axis, at, hi - lo))
            at += hi - lo
    return full


def _spec(
    rule: TensorRule, full: torch.Tensor, cfg: RefitModelConfig, experts: tuple[int, ...]
) -> ShardDescriptor:
    """A whole-tensor descriptor of ``rule``: the style facts the cutting helpers read."""
    grouped = rule.style in EXPERT_STYLES and rule.expert is None
    return ShardDescriptor(
        name=rule.megatron,
        global_shape=(cfg.num_experts, *full.shape[1:]) if grouped else tuple(full.shape),
        dtype=dtype_name(full.dtype),
        style=rule.style,
        shard_axis=rule.axis,
        expert_ids=experts,
        num_experts=cfg.num_experts if rule.style in EXPERT_STYLES else 0,
        num_heads=cfg.num_heads if rule.style == "qkv_column" else 0,
        num_kv_heads=cfg.num_kv_heads if rule.style == "qkv_column" else 0,
        nbytes=full.numel() * full.element_size(),
    )


def hf_meta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s HF parameters (tied names included) as meta tensors of their global shape
    and dtype (a DTensor's shape is the global one)."""
    return {
        n: torch.empty(p.shape, dtype=p.dtype, device="meta")
        for n, p in model.named_parameters(remove_duplicate=False)
    }


def canonical_shapes(
    meta: Mapping[str, torch.Tensor], cfg: RefitModelConfig, expert_layout: str = "per_expert"
) -> dict[str, tuple[int, ...]]:
    """The global shape of every canonical Megatron tensor of the HF parameters ``meta``
    (:func:`hf_meta`), nothing allocated: what a receiver lets a manifest declare."""
    out = {}
    for rule in tensor_rules(cfg, expert_layout):
        full = canonical_from_hf(rule, meta, cfg)
        grouped = rule.style in EXPERT_STYLES and rule.expert is None
        out[rule.megatron] = (cfg.num_experts, *full.shape[1:]) if grouped else tuple(full.shape)
    return out


def megatron_shards_from_hf(
    hf: Mapping[str, torch.Tensor],
    cfg: RefitModelConfig,
    *,
    tp_size: int,
    tp_rank: int,
    ep_size: int = 1,
    ep_rank: int = 0,
    expert_layout: str = "per_expert",
) -> list[tuple[ShardDescriptor, torch.Tensor]]:
    """What trainer rank (tp_rank, ep_rank) publishes: its Megatron shards and descriptors.

    Offsets pack the shards back to back in list order. Experts are split across EP ranks
    (linear placement) and within each expert across TP ranks. Empty shards (a vocab rank
    holding only padding, an FFN narrower than TP) are left out: nothing of size zero reaches
    the data plane.
    """
    if cfg.num_kv_heads % tp_size:
        raise ValueError(f"num_kv_heads={cfg.num_kv_heads} not divisible by trainer tp={tp_size}")
    e_lo, e_hi = expert_range(cfg.num_experts, ep_size, ep_rank) if cfg.num_experts else (0, 0)
    out: list[tuple[ShardDescriptor, torch.Tensor]] = []
    offset = 0
    for rule in tensor_rules(cfg, expert_layout):
        if rule.expert is not None and not e_lo <= rule.expert < e_hi:
            continue
        full = canonical_from_hf(rule, hf, cfg)
        experts: tuple[int, ...] = ()
        if rule.style in EXPERT_STYLES:
            experts = (rule.expert,) if rule.expert is not None else tuple(range(e_lo, e_hi))
            if rule.expert is None:
                full = full[e_lo:e_hi]  # [E_local, ...]
        spec = _spec(rule, full, cfg, experts)
        shard = shard_from_canonical(
            spec, full, tp_size, tp_rank, vocab_divisible_by=cfg.vocab_divisible_by
        )
        if shard.numel() == 0:
            continue
        shard = shard.contiguous()
        segs = rank_segments(spec, tp_size, tp_rank, vocab_divisible_by=cfg.vocab_divisible_by)
        sharded = spec.style != "replicated"
        desc = msgspec.structs.replace(
            spec,
            placement="shard" if sharded or spec.grouped else "replicate",
            shard_range=segs[0] if sharded else None,
            nbytes=shard.numel() * shard.element_size(),
            offset=offset,
        )
        out.append((desc, shard))
        offset += desc.nbytes
    return out


def canonical_from_ranks(
    ranks: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
    specs: Mapping[str, ShardDescriptor],
    *,
    tp_size: int,
    ep_size: int = 1,
    vocab_divisible_by: int = 128,
    merge: Callable[[ShardDescriptor, list[torch.Tensor]], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Receiver side: merge what every target rank ``(tp_rank, ep_rank)`` assembled into the
    canonical tensors. ``specs`` gives each tensor's style facts (a plan's ``TensorPlan.spec``);
    ``merge(spec, shards)`` joins one tensor's TP shards (default :func:`canonical_from_shards`)."""
    if merge is None:
        merge = partial(canonical_from_shards, vocab_divisible_by=vocab_divisible_by)
    out = {}
    for name, d in specs.items():

        def merged(ep_rank: int) -> torch.Tensor:
            shards = [ranks[(t, ep_rank)][name] for t in range(tp_size)]  # noqa: B023
            return merge(d, shards)  # noqa: B023

        if d.grouped:
            out[name] = torch.cat([merged(e) for e in range(ep_size)])
        elif d.per_expert:
            out[name] = merged(d.expert_ids[0] // (d.num_experts // ep_size))
        else:
            out[name] = merged(0)
    return out


def hf_from_canonical(
    canonical: Mapping[str, torch.Tensor], cfg: RefitModelConfig, expert_layout: str = "per_expert"
) -> StagedTensors:
    """Canonical Megatron tensors -> the HF state dict; a tied ``lm_head`` is the embedding
    tensor itself, so the tie survives loading. Tensors that are only regrouped views of the
    canonical ones stay :class:`Regrouped` in ``.entries`` until read or applied."""
    out: dict[str, Staged] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    rules = tensor_rules(cfg, expert_layout)
    for rule in rules:
        if rule.megatron not in canonical:
            raise ValueError(f"tensor {rule.megatron!r}: missing from the refit")
        t = canonical[rule.megatron]
        if rule.expert is not None:
            per_expert.setdefault(rule.hf[0], {})[rule.expert] = t
        else:
            out.update(zip(rule.hf, hf_from_rule(rule, t, cfg), strict=True))
    for name, by_id in per_expert.items():
        out[name] = torch.stack([by_id[e] for e in range(cfg.num_experts)])  # [E, ...]
    if cfg.tie_word_embeddings:
        embedding = next(r.hf[0] for r in rules if r.megatron == WORD_EMBEDDINGS)
        out[LM_HEAD] = out[embedding]
    return StagedTensors(out)
