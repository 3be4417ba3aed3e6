"""Slice planner: extents, assembly kinds, coverage failures, cache, and the property test
HF -> Megatron at S -> plan + assemble at T -> HF over random configs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from refit_core_helpers import publish_all, roundtrip, synthetic_hf

from mx_reference.refit.layouts import RefitModelConfig, tp_range
from mx_reference.refit.planner import (
    IncompleteRefitPlan,
    Piece,
    PlanCache,
    TargetLayout,
    assemble,
    merge_adjacent,
    plan_refit,
)
from mx_reference.refit.wire import ShardDescriptor, make_manifest


def sharded(rank, size, extent=2048, *, axis=0, rng=None, dtype="bfloat16", **kw):
    """One rank's manifest holding a single tensor ``w`` sharded on ``axis``."""
    shape = (extent, 1024) if axis == 0 else (1024, extent)
    rng = rng or tp_range(extent, size, rank)
    local = list(shape)
    local[axis] = rng[1] - rng[0]
    fields = {"style": "row" if axis else "column", "placement": "shard"} | kw
    d = ShardDescriptor(
        name="w",
        global_shape=shape,
        dtype=dtype,
        shard_axis=axis,
        shard_range=rng,
        nbytes=local[0] * local[1] * (2 if dtype == "bfloat16" else 4),
        **fields,
    )
    return make_manifest("m", 1, [d], tp=(rank, size))


def test_target_wider_pulls_a_subslice_of_one_source():
    plan = plan_refit([sharded(r, 2) for r in range(2)], TargetLayout(tp_size=4, tp_rank=0))
    (piece,) = plan.require_complete().tensors["w"].pieces
    assert (piece.src_rank, piece.src_rows, piece.dst_rows) == (0, (0, 512), (0, 512))
    assert plan.tensors["w"].dst_shape == (512, 1024)
    assert piece.src_bytes == (0, 512 * 1024 * 2) and plan.tensors["w"].assembly == "direct"


def test_target_narrower_pulls_whole_shards_of_two_sources():
    plan = plan_refit([sharded(r, 4) for r in range(4)], TargetLayout(tp_size=2, tp_rank=0))
    pieces = plan.require_complete().tensors["w"].pieces
    assert [(p.src_rank, p.src_rows, p.dst_rows) for p in pieces] == [
        (0, (0, 512), (0, 512)),
        (1, (0, 512), (512, 1024)),
    ]


def test_last_rank_destination_is_the_remainder_not_the_whole_axis():
    manifests = [sharded(r, 3, extent=10) for r in range(3)]
    shapes = [
        plan_refit(manifests, TargetLayout(tp_size=4, tp_rank=t)).tensors["w"].dst_shape
        for t in range(4)
    ]
    assert [s[0] for s in shapes] == [2, 2, 2, 4]


def test_row_parallel_narrower_target_needs_scratch():
    manifests = [sharded(r, 4, axis=1) for r in range(4)]
    plan = plan_refit(manifests, TargetLayout(tp_size=2, tp_rank=1)).require_complete()
    t = plan.tensors["w"]
    assert t.assembly == "scratch" and t.dst_shape == (1024, 1024)
    assert all(p.dst_bytes is None and p.src_bytes is not None for p in t.pieces)


def test_pieces_bytes_match_their_views():
    manifests = [sharded(r, 2, extent=12, dtype="float32") for r in range(2)]
    shards = {r: {"w": torch.randn(6, 1024)} for r in range(2)}
    plan = plan_refit(manifests, TargetLayout(tp_size=4, tp_rank=1)).require_complete()
    for p in plan.tensors["w"].pieces:
        off, n = p.src_bytes
        flat = shards[p.src_rank]["w"].view(torch.uint8).reshape(-1)[off : off + n]
        assert torch.equal(
            flat, p.src_view(shards[p.src_rank]["w"]).contiguous().view(torch.uint8).reshape(-1)
        )


def test_merge_adjacent_merges_only_pieces_adjacent_on_both_sides():
    a = Piece(0, "w", 0, (0, 2), (0, 2))
    b = Piece(0, "w", 0, (2, 4), (2, 4))
    c = Piece(0, "w", 0, (6, 8), (4, 6))
    assert merge_adjacent([a, b, c]) == [Piece(0, "w", 0, (0, 4), (0, 4)), c]


def test_target_rank_comes_from_the_reported_layout_not_the_global_rank():
    # TP=4 x PP=2: global rank 5 is tp rank 1 of pp stage 1.
    assert TargetLayout.from_global_rank(5, tp_size=4) == TargetLayout(tp_size=4, tp_rank=1)
    with pytest.raises(ValueError, match="tp_rank"):
        TargetLayout(tp_size=4, tp_rank=5)


# ---- fail closed -----------------------------------------------------------------------------


def missing_reasons(manifests, target=None, **kw) -> str:
    plan = plan_refit(manifests, target or TargetLayout(), **kw)
    assert plan.missing
    with pytest.raises(IncompleteRefitPlan) as e:
        plan.require_complete()
    with pytest.raises(ValueError):
        assemble(plan, {})
    return str(e.value)


def test_gap_is_missing():
    msg = missing_reasons([sharded(0, 4), sharded(1, 4), sharded(3, 4)])
    assert "'w'" in msg and "shard_range" in msg and "[1024, 1536)" in msg


def test_overlap_is_missing():
    msg = missing_reasons([sharded(0, 2, rng=(0, 1100)), sharded(1, 2)])
    assert "'w'" in msg and "overlap" in msg


def test_disagreeing_global_shapes_are_missing():
    msg = missing_reasons([sharded(0, 2), sharded(1, 2, extent=2050, rng=(1024, 2050))])
    assert "'w'" in msg and "global_shape" in msg


def test_dtype_mismatch_across_ranks_and_against_the_receiver():
    assert "dtype" in missing_reasons([sharded(0, 2), sharded(1, 2, dtype="float32")])
    msg = missing_reasons([sharded(r, 2) for r in range(2)], expected={"w": "float32"})
    assert "'w'" in msg and "dtype" in msg


def test_partial_placement_is_missing():
    assert "partial" in missing_reasons([sharded(r, 2, placement="partial") for r in range(2)])


def test_unpublished_expected_tensor_is_missing():
    msg = missing_reasons(
        [sharded(r, 2) for r in range(2)], expected={"w": "bfloat16", "x": "bfloat16"}
    )
    assert "'x'" in msg and "no source" in msg


def test_indivisible_target_heads_are_missing():
    cfg = RefitModelConfig(1, 8, 4, 2, 2, 6, 64)
    manifests, _ = publish_all(synthetic_hf(cfg), cfg, tp=2)
    msg = missing_reasons(manifests, TargetLayout(tp_size=8, tp_rank=0))
    assert "linear_qkv.weight" in msg and "num_kv_heads=2" in msg


@pytest.mark.parametrize("layout", ["grouped", "per_expert"])
def test_missing_experts_are_missing(layout):
    cfg = RefitModelConfig(1, 8, 4, 2, 2, 6, 64, num_experts=4)
    manifests, _ = publish_all(synthetic_hf(cfg), cfg, tp=1, ep=2, layout=layout)
    ep0 = [m for m in manifests if m.ep_rank == 0]
    plan = plan_refit(ep0, TargetLayout(ep_size=1))
    if layout == "grouped":
        assert "experts [2, 4)" in " ".join(
            plan.missing["decoder.layers.0.mlp.experts.linear_fc1.weight"]
        )
    else:  # per-expert names are only known to the receiver
        full = plan_refit(manifests, TargetLayout()).require_complete()
        expected = {n: t.spec.dtype for n, t in full.tensors.items()}
        plan = plan_refit(ep0, TargetLayout(), expected=expected)
        assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight" in plan.missing
    with pytest.raises(IncompleteRefitPlan):
        plan.require_complete()


def test_inconsistent_manifests_raise():
    with pytest.raises(ValueError, match="published twice"):
        plan_refit([sharded(0, 2), sharded(0, 2)], TargetLayout())
    other = make_manifest("m", 2, sharded(1, 2).tensors, tp=(1, 2))
    with pytest.raises(ValueError, match="'version'"):
        plan_refit([sharded(0, 2), other], TargetLayout())


# ---- cache -----------------------------------------------------------------------------------


def test_plan_cache_hits_across_versions_and_rebuilds_on_layout_change():
    cfg = RefitModelConfig(1, 8, 4, 2, 2, 6, 64)
    hf = synthetic_hf(cfg)
    cache = PlanCache(max_entries=2)
    v1, _ = publish_all(hf, cfg, tp=2, version=1)
    v2, _ = publish_all(hf, cfg, tp=2, version=2)
    target = TargetLayout(tp_size=1)
    first = cache.get(v1, target, cfg)
    assert cache.get(v2, target, cfg) is first and (cache.hits, cache.misses) == (1, 1)
    assert cache.get(v2, TargetLayout(tp_size=2, tp_rank=1), cfg) is not first
    resharded, _ = publish_all(hf, cfg, tp=1, version=3)
    assert cache.get(resharded, target, cfg) is not first
    assert cache.misses == 3 and len(cache._plans) == 2


@pytest.mark.reliability
def test_plan_cache_hit_refuses_a_mixed_version_set():
    # rank 0 at v2 and rank 1 at v1 is no version at all: plan_refit refuses it, and so must a
    # cache that already holds the plan of a consistent set with the same layout
    cfg = RefitModelConfig(1, 8, 4, 2, 2, 6, 64)
    hf = synthetic_hf(cfg)
    v1, _ = publish_all(hf, cfg, tp=2, version=1)
    v2, _ = publish_all(hf, cfg, tp=2, version=2)
    mixed = [v2[0], v1[1]]
    with pytest.raises(ValueError, match="field 'version': 1 != 2"):
        plan_refit(mixed, TargetLayout())
    cache = PlanCache()
    cache.get(v1, TargetLayout(), cfg)
    with pytest.raises(ValueError, match="field 'version': 1 != 2"):
        cache.get(mixed, TargetLayout(), cfg)
    assert (cache.hits, cache.misses) == (0, 1)


# ---- the property test -----------------------------------------------------------------------

POW2 = [1, 2, 4, 8]


@st.composite
def refit_cases(draw):
    groups = draw(st.sampled_from([1, 2, 8]))
    heads = groups * draw(st.sampled_from([1, 2, 4]))
    experts = draw(st.sampled_from([0, 2, 4]))
    cfg = RefitModelConfig(
        num_layers=1,
        hidden_size=draw(st.integers(1, 6)),
        num_heads=heads,
        num_kv_heads=groups,
        head_dim=draw(st.integers(1, 3)),
        intermediate_size=draw(st.integers(1, 11)),
        vocab_size=draw(st.sampled_from([50257, 151936, 37, 1000])),
        tie_word_embeddings=draw(st.booleans()),
        num_experts=experts,
        qkv_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
    )
    src_tp = draw(st.sampled_from([t for t in POW2 if groups % t == 0]))
    dst_tp = draw(st.sampled_from([t for t in POW2 if t <= heads]))
    eps = [e for e in (1, 2, 4) if experts and experts % e == 0] or [1]
    return (
        cfg,
        src_tp,
        dst_tp,
        draw(st.sampled_from(eps)),
        draw(st.sampled_from(eps)),
        draw(st.sampled_from(["per_expert", "grouped"])),
    )


@given(case=refit_cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_round_trip_over_random_configs_is_bit_identical(case, dtype):
    cfg, src_tp, dst_tp, src_ep, dst_ep, layout = case
    hf = synthetic_hf(cfg, dtype=dtype)
    out, plans = roundtrip(
        hf, cfg, src_tp=src_tp, dst_tp=dst_tp, src_ep=src_ep, dst_ep=dst_ep, layout=layout
    )
    assert out.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(out[name], tensor), name
    assert sum(len(p.tensors) for p in plans) > 0
