"""Sharded targets: position checksums compose, row numbers translate into the right canonical
rows, strided pieces become exact spans, and layouts no plan covers are refused."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mx_reference.refit.layouts import hf_meta, megatron_shards_from_hf, qkv_segments
from mx_reference.refit.name_maps import RefitModelConfig
from mx_reference.refit.planner import Piece, TargetLayout, piece_spans
from mx_reference.refit.shards import Padding, ShardTarget, SlicePart, chunk_range
from mx_reference.refit.wire import CHECKSUM_MASK, box_checksum, shard_checksum
from mx_sim.conformance.sharded_adapter import cut, vllm_layout
from mx_sim.fixtures import TinyModelSpec, build_tiny_model


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(2, 12),
    cols=st.integers(1, 6),
    cuts=st.lists(st.integers(1, 11), max_size=4),
    axis=st.sampled_from([0, 1]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int8]),
)
def test_checksums_of_disjoint_boxes_add_up_to_the_whole(rows, cols, cuts, axis, dtype):
    full = (torch.randn(rows, cols) * 50).to(dtype)
    extent = full.shape[axis]
    bounds = sorted({0, extent, *(c for c in cuts if c < extent)})
    parts = 0
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        starts = [0, 0]
        starts[axis] = lo
        parts += box_checksum(full.narrow(axis, lo, hi - lo), tuple(full.shape), tuple(starts))
    assert parts & CHECKSUM_MASK == box_checksum(full, tuple(full.shape), (0, 0))


def _checksum_by_definition(block: torch.Tensor, starts: tuple[int, ...]) -> int:
    """The sum over int32 words of (word + 1) * w(global index) mod 2**32, word by word."""
    size = block.element_size()
    words = block.contiguous().view({1: torch.int8, 2: torch.int16}.get(size, torch.int32))
    per, last = max(size // 4, 1), words.dim() - 1  # an 8-byte element is two words
    total = 0
    for index in itertools.product(*(range(n) for n in words.shape)):
        weight = 1
        for d, i in enumerate(index):
            g = i + starts[d] * (per if d == last else 1)
            weight *= (g * 0x9E3779B9 + ((d + 1) * 0x2545F491 & 0x7FFFFFFF)) & CHECKSUM_MASK | 1
        total += (int(words[index]) + 1) * weight
    return total & CHECKSUM_MASK


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    starts=st.lists(st.integers(0, 7), min_size=3, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int8]),
    block_words=st.sampled_from([1, 3, 1 << 18]),
)
def test_checksum_is_its_definition_for_any_block_size(shape, starts, dtype, block_words):
    import mx_reference.refit.wire as wire

    block = (torch.randn(shape) * 50).to(dtype)
    at = tuple(starts[: len(shape)])
    global_shape = tuple(s + a for s, a in zip(shape, at, strict=True))
    old, wire._FOLD_WORDS = wire._FOLD_WORDS, block_words  # one row, or rows, at a time
    try:
        assert box_checksum(block, global_shape, at) == _checksum_by_definition(block, at)
    finally:
        wire._FOLD_WORDS = old


def test_checksum_sees_one_flipped_bit_and_two_swapped_elements():
    full = torch.randn(8, 4)
    shape, whole = tuple(full.shape), box_checksum(full, (8, 4), (0, 0))
    flipped = full.clone()
    flipped.view(torch.int32)[3, 1] ^= 1
    swapped = full.clone()
    swapped[[2, 5]] = full[[5, 2]]
    assert box_checksum(flipped, shape, (0, 0)) != whole
    assert box_checksum(swapped, shape, (0, 0)) != whole


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_published_shard_checksums_sum_to_the_canonical_tensor(tp):
    model = build_tiny_model("llama", TinyModelSpec(vocab_size=200, num_kv_heads=4))
    cfg = RefitModelConfig.from_hf(model.config)
    state = model.state_dict()
    ranks = [megatron_shards_from_hf(state, cfg, tp_size=tp, tp_rank=r) for r in range(tp)]
    whole = {d.name: (d, t) for d, t in megatron_shards_from_hf(state, cfg, tp_size=1, tp_rank=0)}
    for name, (d, canonical) in whole.items():
        published = [shard_checksum(s, t) for shards in ranks for s, t in shards if s.name == name]
        want = box_checksum(canonical, d.global_shape, (0,) * canonical.dim())
        if d.style == "replicated":  # every rank holds it whole: each copy checksums alike
            assert published == [want] * tp
        else:
            assert sum(published) & CHECKSUM_MASK == want


def _target(kind: str, spec: TinyModelSpec, tp: int, rank: int) -> tuple[ShardTarget, dict]:
    model = build_tiny_model(kind, spec)
    meta = hf_meta(model)
    params = dict(model.named_parameters())
    layout = vllm_layout({n: meta[n] for n in params}, model.config, tp, rank)
    shapes = {name: tuple(cut(params, parts).shape) for name, parts in layout.items()}
    cfg = RefitModelConfig.from_hf(model.config)
    target = ShardTarget.build(
        layout, shapes, meta, cfg, position=TargetLayout(tp_size=tp, tp_rank=rank)
    )
    return target, layout


def _joined(rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(rows):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


@pytest.mark.parametrize(("tp", "groups"), [(2, 2), (4, 2), (2, 1), (4, 4)])
def test_a_vllm_rank_wants_megatrons_own_qkv_and_fc1_slices(tp, groups):
    spec = TinyModelSpec(num_kv_heads=groups)
    for rank in range(tp):
        target, _ = _target("llama", spec, tp, rank)
        rows = target.by_name
        qkv = rows["decoder.layers.0.self_attention.linear_qkv.weight"][1]
        extent = (4 + 2 * groups) * 16
        want = qkv_segments(extent, tp, rank, num_heads=4, num_kv_heads=groups)
        assert list(qkv) == _joined(want)
        fc1 = rows["decoder.layers.0.mlp.linear_fc1.weight"][1]
        lo, hi = chunk_range(96, tp, rank)
        assert list(fc1) == [(lo, hi), (96 + lo, 96 + hi)]
        axis, proj = rows["decoder.layers.0.self_attention.linear_proj.weight"]
        assert axis == 1 and list(proj) == [chunk_range(64, tp, rank)]


def test_padding_rows_are_wanted_from_no_source_and_written_by_no_run():
    spec = TinyModelSpec(vocab_size=300)  # vLLM pads it to 320: 160 rows a rank at TP 2
    target, layout = _target("llama", spec, 2, 1)
    embed = "model.embed_tokens.weight"
    assert layout[embed] == (SlicePart(embed, 0, 160, 300), Padding(0, 20))
    assert target.by_name["embedding.word_embeddings.weight"] == (0, ((160, 300),))
    written = [(r.start, r.start + r.length) for r in target.runs if r.local == embed]
    assert _joined(written) == [(0, 140)]  # local rows 140..160 are padding


def test_a_stacked_expert_parameter_is_cut_expert_by_expert():
    model = build_tiny_model("mixtral", TinyModelSpec())
    meta, cfg = hf_meta(model), RefitModelConfig.from_hf(model.config)
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"  # (E, 2I, H): packed, rank 1 of 2
    layout = {gate_up: (SlicePart(gate_up, 1, 48, 96), SlicePart(gate_up, 1, 144, 192))}
    target = ShardTarget.build(
        layout, {gate_up: (4, 96, 64)}, meta, cfg, position=TargetLayout(tp_size=2, tp_rank=1)
    )
    rows = target.by_name
    for e in range(4):
        fc1 = rows[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"][1]
        assert list(fc1) == [(48, 96), (144, 192)]  # rank 1's gate rows, then its up rows
    assert {r.expert for r in target.runs} == {0, 1, 2, 3}


def test_bad_layouts_name_the_tensor_and_field():
    model = build_tiny_model("llama", TinyModelSpec())
    meta, cfg = hf_meta(model), RefitModelConfig.from_hf(model.config)
    o = "model.layers.0.self_attn.o_proj.weight"
    q = "model.layers.0.self_attn.q_proj.weight"
    cases = {
        "dim": ({o: (SlicePart(o, 0, 0, 32),)}, {o: (32, 64)}),
        "placement": ({q: (SlicePart(q, 0, 0, 24),)}, {q: (24, 64)}),  # 3 ranks over 4 heads
        "shape": ({o: (SlicePart(o, 1, 0, 32),)}, {o: (64, 31)}),
        "hf_name": ({"x": (SlicePart("model.nope", 0, 0, 1),)}, {"x": (1,)}),
        "stop": ({o: (SlicePart(o, 1, 0, 65),)}, {o: (64, 65)}),
        "parts": ({o: (Padding(0, 64),)}, {o: (64, 64)}),
    }
    for field, (layout, shapes) in cases.items():
        with pytest.raises(ValueError, match=f"field '{field}'"):
            ShardTarget.build(layout, shapes, meta, cfg, position=TargetLayout())
    across = {o: (SlicePart(o, 1, 0, 64), Padding(0, 8))}  # padding along another dim
    with pytest.raises(ValueError, match=rf"'{o}'.*field 'dim'"):
        ShardTarget.build(across, {o: (64, 72)}, meta, cfg, position=TargetLayout())
    empty = {o: (SlicePart(o, 1, 0, 64), Padding(1, 0))}
    with pytest.raises(ValueError, match=rf"'{o}'.*field 'rows'"):
        ShardTarget.build(empty, {o: (64, 64)}, meta, cfg, position=TargetLayout())


def test_a_whole_parameter_may_be_declared_along_any_dim():
    model = build_tiny_model("llama", TinyModelSpec())
    meta, cfg = hf_meta(model), RefitModelConfig.from_hf(model.config)
    o = "model.layers.0.self_attn.o_proj.weight"  # row-parallel: its rows vary along dim 1
    for dim in (0, 1):
        target = ShardTarget.build(
            {o: (SlicePart(o, dim, 0, 64),)}, {o: (64, 64)}, meta, cfg, position=TargetLayout()
        )
        proj = "decoder.layers.0.self_attention.linear_proj.weight"
        assert target.by_name[proj] == (1, ((0, 64),))


@settings(max_examples=60, deadline=None)
@given(
    outer=st.integers(1, 4),
    src_cols=st.integers(2, 8),
    data=st.data(),
)
def test_piece_spans_copy_exactly_the_piece(outer, src_cols, data):
    lo = data.draw(st.integers(0, src_cols - 1))
    hi = data.draw(st.integers(lo + 1, src_cols))
    dst_cols = data.draw(st.integers(hi - lo, hi - lo + 3))
    at = data.draw(st.integers(0, dst_cols - (hi - lo)))
    src = torch.arange(outer * src_cols, dtype=torch.float32).view(outer, src_cols)
    dst, want = torch.zeros(outer, dst_cols), torch.zeros(outer, dst_cols)
    piece = Piece(0, "t", 1, (lo, hi), (at, at + hi - lo))
    piece.dst_view(want).copy_(piece.src_view(src))
    src_bytes, dst_bytes = src.view(-1).view(torch.uint8), dst.view(-1).view(torch.uint8)
    spans = piece_spans(piece, src.shape, dst.shape, 4)
    for s, d, n in spans:
        dst_bytes[d : d + n] = src_bytes[s : s + n]
    assert torch.equal(dst, want)
    assert sum(n for _, _, n in spans) == outer * (hi - lo) * 4  # no byte beyond the piece


@pytest.mark.timeout(60)
def test_short_spans_go_through_scratch_with_the_same_values():
    from mx_reference.refit.shards import ShardedRefitReceiver
    from mx_sim.conformance.sharded_adapter import cut, vllm_layout
    from mx_sim.fixtures import version_model
    from mx_sim.refit.rig import RefitRig, Replica, RigConfig

    spec, tp = TinyModelSpec(num_kv_heads=4), 4
    with RefitRig(RigConfig("llama", spec, trainer_tp=2)) as rig, Replica(tp) as replica:
        full = version_model("llama", spec, 0)
        params = {n: p.detach() for n, p in full.named_parameters()}
        layouts = [
            vllm_layout(dict(full.named_parameters()), full.config, tp, r) for r in range(tp)
        ]
        locals_ = [{n: cut(params, ps).clone() for n, ps in lay.items()} for lay in layouts]
        receivers = replica.map(
            lambda r: rig.new_receiver(
                full,
                make=ShardedRefitReceiver,
                target=TargetLayout(tp_size=tp, tp_rank=r),
                group=replica.groups[r],
                layout=layouts[r],
                local=locals_[r],
                backend=rig.backend,
                min_span_bytes=1 << 20,  # every strided piece: whole source shard to scratch
            )
        )
        for v in (1, 2):
            rig.publish(v)
            timings = replica.map(lambda r: receivers[r].refit(v))  # noqa: B023
            want = rig.weights.params(v)
            for r in range(tp):
                held = sum(t.numel() * t.element_size() for t in locals_[r].values())
                assert timings[r].bytes_pulled > held  # row-parallel shards pulled whole
                assert (timings[r].registrations, timings[r].bytes_allocated == 0) == (
                    (2, False) if v == 1 else (0, True)  # dest + scratch arenas, then none
                )
                for n, parts in layouts[r].items():
                    assert torch.equal(locals_[r][n], cut(want, parts)), (v, r, n)
