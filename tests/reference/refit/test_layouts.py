"""Megatron <-> HF layouts: hand-checked small cases, inverses, vocab, experts, real HF models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from refit_core_helpers import roundtrip, synthetic_hf

from mx_reference.refit.apply import apply_in_place, check_staged
from mx_reference.refit.layouts import (
    RefitModelConfig,
    Regrouped,
    StagedTensors,
    canonical_from_hf,
    global_expert_id,
    hf_from_canonical,
    hf_gate_up_from_megatron,
    hf_qkv_from_megatron,
    hf_qkv_groups_from_megatron,
    megatron_fc1_shards_from_hf,
    megatron_name_map,
    megatron_qkv_from_hf,
    megatron_shards_from_hf,
    padded_vocab_size,
    qkv_segments,
    tp_range,
    vocab_range,
)
from mx_reference.refit.name_maps import tensor_rules
from mx_reference.refit.wire import shard_digest


def rows(n: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1)  # [n, 1]


def test_tp_range_gives_the_last_rank_the_remainder_not_the_whole_axis():
    assert [tp_range(10, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 10)]
    assert tp_range(10, 4, 3)[1] - tp_range(10, 4, 3)[0] == 10 - 2 * 3
    with pytest.raises(ValueError, match="tp rank 4"):
        tp_range(10, 4, 4)


def test_qkv_interleaves_per_group_not_concatenated():
    q, k, v = rows(4), rows(2, 100), rows(2, 200)  # H=4, G=2, D=1
    qkv = megatron_qkv_from_hf(q, k, v, num_heads=4, num_kv_heads=2)
    assert qkv.squeeze(1).tolist() == [0, 1, 100, 200, 2, 3, 101, 201]
    assert not torch.equal(qkv, torch.cat([q, k, v]))
    back = hf_qkv_from_megatron(qkv, num_heads=4, num_kv_heads=2)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


@given(
    groups=st.sampled_from([1, 2, 8]),
    per_group=st.sampled_from([1, 2, 4]),
    head_dim=st.integers(1, 4),
    hidden=st.integers(1, 5),
    bias=st.booleans(),
    transposed_param=st.booleans(),
)
def test_qkv_round_trip_mha_gqa_mqa(groups, per_group, head_dim, hidden, bias, transposed_param):
    h, g = groups * per_group, groups
    shape = (lambda n: (n * head_dim,)) if bias else (lambda n: (n * head_dim, hidden))
    q, k, v = torch.randn(shape(h)), torch.randn(shape(g)), torch.randn(shape(g))
    qkv = megatron_qkv_from_hf(q, k, v, num_heads=h, num_kv_heads=g)
    assert qkv.shape[0] == (h + 2 * g) * head_dim
    out = hf_qkv_from_megatron(qkv, num_heads=h, num_kv_heads=g)
    assert all(torch.equal(a, b) for a, b in zip(out, (q, k, v), strict=True))
    # the receiver's form: views grouped per query group, copied straight into the parameter
    views = hf_qkv_groups_from_megatron(qkv, num_heads=h, num_kv_heads=g)
    for view, want in zip(views, (q, k, v), strict=True):
        assert view.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
        lazy = Regrouped(view, want.shape)
        assert torch.equal(lazy.materialize(), want)
        # a parameter stored transposed (non-contiguous) takes the materialized copy
        param = torch.zeros(want.shape[::-1]).t() if transposed_param else torch.zeros(want.shape)
        lazy.copy_into(param)
        assert torch.equal(param, want)


def test_staged_tensors_defer_the_qkv_copy_to_apply():
    cfg = RefitModelConfig(
        num_layers=1, hidden_size=6, num_heads=4, num_kv_heads=2, head_dim=2,
        intermediate_size=4, vocab_size=10, vocab_divisible_by=2,
    )  # fmt: skip
    hf = synthetic_hf(cfg)
    canonical = {r.megatron: canonical_from_hf(r, hf, cfg) for r in tensor_rules(cfg, "per_expert")}
    staged = hf_from_canonical(canonical, cfg)
    qkv = canonical["decoder.layers.0.self_attention.linear_qkv.weight"]
    q = "model.layers.0.self_attn.q_proj.weight"
    entry = staged.entries[q]
    assert isinstance(entry, Regrouped)
    assert entry.source.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert set(staged) == set(hf) and all(torch.equal(staged[n], hf[n]) for n in hf)
    params = {n: torch.zeros_like(t) for n, t in hf.items()}
    addresses = {n: t.data_ptr() for n, t in params.items()}
    wrong = StagedTensors(dict(staged.entries, **{q: Regrouped(entry.source, torch.Size((4, 12)))}))
    with pytest.raises(ValueError, match=f"{q}: staged shape"):
        check_staged(params, wrong)
    assert all(not t.any() for t in params.values())
    apply_in_place(params, staged)
    assert all(torch.equal(params[n], hf[n]) for n in hf)
    assert {n: t.data_ptr() for n, t in params.items()} == addresses


@given(
    split=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    other=st.integers(1, 4),
    axis=st.sampled_from([0, 1]),
)
def test_shard_digest_of_pieces_is_the_digest_of_their_concatenation(split, other, axis):
    pieces = [torch.randn((n, other) if axis == 0 else (other, n)) for n in split]
    assert shard_digest(*pieces, axis=axis) == shard_digest(torch.cat(pieces, axis))


def test_qkv_with_more_ranks_than_kv_heads_replicates_kv():
    # H=4, G=2, D=1 at tp=4: each rank one q head and its group's k, v.
    segs = [qkv_segments(8, 4, r, num_heads=4, num_kv_heads=2) for r in range(4)]
    assert segs == [[(0, 1), (2, 4)], [(1, 2), (2, 4)], [(4, 5), (6, 8)], [(5, 6), (6, 8)]]


def test_qkv_bad_head_counts_raise():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        megatron_qkv_from_hf(rows(4), rows(3), rows(3), num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="tp=8"):
        qkv_segments(8, 8, 0, num_heads=4, num_kv_heads=2)


def test_gated_mlp_shards_are_gate_r_up_r_and_halving_the_concat_is_wrong():
    gate, up = rows(4), rows(4, 10)
    shards = megatron_fc1_shards_from_hf(gate, up, tp=2)
    assert [s.squeeze(1).tolist() for s in shards] == [[0, 1, 10, 11], [2, 3, 12, 13]]
    g2, u2 = hf_gate_up_from_megatron(shards)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    naive_gate, _ = torch.cat(shards).chunk(2)
    assert not torch.equal(naive_gate, gate)


@pytest.mark.parametrize(
    ("vocab", "tp", "padded"), [(50257, 1, 50304), (50257, 8, 51200), (151936, 8, 152576)]
)
def test_vocab_padding_and_truncation(vocab, tp, padded):
    assert padded_vocab_size(vocab, tp) == padded
    ranges = [vocab_range(vocab, tp, r) for r in range(tp)]
    assert sum(hi - lo for lo, hi in ranges) == vocab
    assert ranges[-1][1] == vocab and ranges[-1][1] - ranges[-1][0] < padded // tp or tp == 1


def test_vocab_rank_past_the_real_vocab_holds_nothing():
    assert [vocab_range(10, 8, r, divisible_by=8) for r in range(3)] == [(0, 8), (8, 10), (10, 10)]


def test_global_expert_id():
    assert global_expert_id(1, ep_rank=2, num_experts=8, ep_size=4) == 5
    with pytest.raises(ValueError, match="num_experts=6"):
        global_expert_id(0, ep_rank=0, num_experts=6, ep_size=4)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
def test_name_map_covers_the_real_hf_state_dict(kind):
    from mx_sim.fixtures import TinyModelSpec, build_tiny_model

    model = build_tiny_model(kind, TinyModelSpec(tie_word_embeddings=kind == "qwen2"))
    cfg = RefitModelConfig.from_hf(model.config)
    hf_names = {n for names in megatron_name_map(cfg).values() for n in names}
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert hf_names == expected


def test_tied_embeddings_are_sent_once_and_the_tie_restored():
    cfg = RefitModelConfig(2, 8, 4, 2, 2, 6, 50, tie_word_embeddings=True)
    hf = synthetic_hf(cfg)
    names = [d.name for d, _ in megatron_shards_from_hf(hf, cfg, tp_size=2, tp_rank=0)]
    assert "output_layer.weight" not in names and "embedding.word_embeddings.weight" in names
    # vocab 50 pads to 256 at tp 2: rank 1 holds only padding and publishes no embedding shard
    names = [d.name for d, _ in megatron_shards_from_hf(hf, cfg, tp_size=2, tp_rank=1)]
    assert "embedding.word_embeddings.weight" not in names
    out, _ = roundtrip(hf, cfg, src_tp=2, dst_tp=1)
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]
    assert torch.equal(out["lm_head.weight"], hf["lm_head.weight"])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 4), (2, 8)])
def test_real_hf_model_round_trip_is_bit_identical(kind, src_tp, dst_tp):
    from mx_sim.fixtures import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(num_heads=8, num_kv_heads=2, tie_word_embeddings=kind == "qwen2")
    model = build_tiny_model(kind, spec)
    cfg = RefitModelConfig.from_hf(model.config)
    hf = model.state_dict()
    for layout in ("per_expert", "grouped") if cfg.num_experts else ("per_expert",):
        out, _ = roundtrip(hf, cfg, src_tp=src_tp, dst_tp=dst_tp, layout=layout)
        assert out.keys() == hf.keys()
        for name, tensor in hf.items():
            assert torch.equal(out[name], tensor), name
    # The round trip must not be the identity by accident: the fused Megatron tensors differ.
    qkv = megatron_qkv_from_hf(
        *(hf[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"),
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
    )
    assert not torch.equal(
        qkv, torch.cat([hf[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    )


def test_trainer_tp_must_divide_kv_heads():
    cfg = RefitModelConfig(1, 8, 4, 2, 2, 6, 50)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        megatron_shards_from_hf(synthetic_hf(cfg), cfg, tp_size=4, tp_rank=0)


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_llama_with_attention_and_mlp_biases_round_trips(src_tp, dst_tp):
    # HF Llama's attention_bias adds q/k/v *and* o_proj biases, mlp_bias gate/up/down ones;
    # they used to be accepted by from_hf and refused only at verify, after the whole pull
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    cfg = RefitModelConfig.from_hf(config)
    assert (cfg.qkv_bias, cfg.proj_bias, cfg.mlp_bias) == (True, True, True)
    hf = {n: p.detach() for n, p in model.named_parameters()}
    out, _ = roundtrip(hf, cfg, src_tp=src_tp, dst_tp=dst_tp)
    assert set(out) == set(hf)
    assert all(torch.equal(out[n], hf[n]) for n in hf)


def test_mixed_dense_and_moe_layers_map_each_layer_by_its_kind():
    import transformers

    for config, dense in (
        (transformers.Qwen3MoeConfig(mlp_only_layers=[0], num_hidden_layers=3), (0,)),
        (transformers.Qwen3MoeConfig(decoder_sparse_step=2, num_hidden_layers=4), (0, 2)),
        (transformers.DeepseekV3Config(first_k_dense_replace=2, num_hidden_layers=3), (0, 1)),
    ):
        cfg = RefitModelConfig.from_hf(config)
        assert cfg.dense_layers == dense
        names = megatron_name_map(cfg)
        for i in range(config.num_hidden_layers):
            assert (f"decoder.layers.{i}.mlp.linear_fc1.weight" in names) == (i in dense)
            assert (f"decoder.layers.{i}.mlp.router.weight" in names) == (i not in dense)
