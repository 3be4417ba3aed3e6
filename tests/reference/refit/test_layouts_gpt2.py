"""GPT-2 in the refit layouts: Conv1D weights, the fused c_attn, biases, position embeddings and
the tied lm_head, on real HF ``GPT2LMHeadModel`` s; plus the CI matrix's tied-embeddings row."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from refit_core_helpers import roundtrip

from mx_reference.refit.layouts import (
    RefitModelConfig,
    megatron_name_map,
    megatron_shards_from_hf,
)
from mx_sim.fixtures import fixed_prompt


def gpt2(vocab=200, heads=4, head_dim=8, n_inner=None, layers=1, tied=True, seed=0):
    """A real GPT-2 with random weights; ``n_inner`` None means HF's default 4H."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=heads * head_dim,
        n_layer=layers,
        n_head=heads,
        n_inner=n_inner,
        n_positions=16,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config).eval()


def assert_same_state(out: dict, hf: dict) -> None:
    assert out.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(out[name], tensor), name


def test_from_hf_reads_gpt2_and_names_unsupported_model_types():
    cfg = RefitModelConfig.from_hf(gpt2(heads=4, head_dim=8, n_inner=40).config)
    assert (cfg.family, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("gpt2", 4, 4, 8)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.tie_word_embeddings) == (32, 40, True)
    assert RefitModelConfig.from_hf(gpt2(n_inner=None).config).intermediate_size == 4 * 32

    import transformers

    with pytest.raises(ValueError, match="model_type 'bloom'"):
        RefitModelConfig.from_hf(transformers.BloomConfig())
    with pytest.raises(ValueError, match="family 't5'"):
        RefitModelConfig(1, 8, 2, 2, 4, 16, 50, family="t5")


@pytest.mark.parametrize("tied", [True, False])
def test_name_map_covers_the_real_gpt2_state_dict(tied):
    model = gpt2(tied=tied, layers=2)
    cfg = RefitModelConfig.from_hf(model.config)
    names = megatron_name_map(cfg)
    hf_names = [n for hf in names.values() for n in hf]
    assert len(hf_names) == len(set(hf_names))
    assert set(hf_names) == set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert ("output_layer.weight" in names) is not tied
    assert names["embedding.position_embeddings.weight"] == ("transformer.wpe.weight",)


def test_conv1d_c_attn_becomes_the_per_head_interleaved_linear_qkv():
    model = gpt2(heads=2, head_dim=3)  # H = G = 2, D = 3, hidden 6
    cfg = RefitModelConfig.from_hf(model.config)
    hf = model.state_dict()
    shards = dict(megatron_shards_from_hf(hf, cfg, tp_size=1, tp_rank=0))
    by_name = {d.name: t for d, t in shards.items()}
    c_attn = hf["transformer.h.0.attn.c_attn.weight"]  # [in=6, out=q|k|v=18]
    qkv = by_name["decoder.layers.0.self_attention.linear_qkv.weight"]  # [18, 6]
    d = 3
    # head g's rows are [q_g; k_g; v_g]; q|k|v sit at column offsets 0, H·D, 2·H·D of c_attn
    want = torch.cat(
        [
            c_attn[:, part * 6 + g * d : part * 6 + (g + 1) * d].T
            for g in (0, 1)
            for part in (0, 1, 2)
        ]
    )
    assert torch.equal(qkv, want)
    assert not torch.equal(qkv, c_attn.T)  # a bare transpose keeps q|k|v unsplit: wrong
    bias = by_name["decoder.layers.0.self_attention.linear_qkv.bias"]
    c_bias = hf["transformer.h.0.attn.c_attn.bias"]
    assert torch.equal(bias[:d], c_bias[:d]) and torch.equal(bias[d : 2 * d], c_bias[6 : 6 + d])
    fc1 = by_name["decoder.layers.0.mlp.linear_fc1.weight"]
    assert fc1.shape == (24, 6) and torch.equal(fc1, hf["transformer.h.0.mlp.c_fc.weight"].T)


def test_trainer_tp2_styles_and_ranges():
    model = gpt2(vocab=200, heads=4, head_dim=8, n_inner=40)
    cfg = RefitModelConfig.from_hf(model.config)
    hf = model.state_dict()
    for rank, vocab_rows in ((0, (0, 128)), (1, (128, 200))):  # vocab 200 pads to 256 at TP2
        descs = {d.name: d for d, _ in megatron_shards_from_hf(hf, cfg, tp_size=2, tp_rank=rank)}
        lo = rank * 20
        facts = {
            "embedding.word_embeddings.weight": ("vocab_parallel", "shard", vocab_rows),
            "embedding.position_embeddings.weight": ("replicated", "replicate", None),
            "decoder.layers.0.mlp.linear_fc1.weight": ("column", "shard", (lo, lo + 20)),
            "decoder.layers.0.mlp.linear_fc1.bias": ("column", "shard", (lo, lo + 20)),
            "decoder.layers.0.mlp.linear_fc2.weight": ("row", "shard", (lo, lo + 20)),
            "decoder.layers.0.mlp.linear_fc2.bias": ("replicated", "replicate", None),
            "decoder.layers.0.self_attention.linear_proj.bias": ("replicated", "replicate", None),
            "decoder.layers.0.self_attention.linear_qkv.bias": (
                "qkv_column",
                "shard",
                (rank * 48, rank * 48 + 48),
            ),
        }
        for name, want in facts.items():
            d = descs[name]
            assert (d.style, d.placement, d.shard_range) == want, name
        assert descs["decoder.layers.0.mlp.linear_fc2.weight"].local_shape == (32, 20)
        assert "output_layer.weight" not in descs


@settings(max_examples=25)
@given(
    src_tp=st.sampled_from([1, 2, 4]),
    dst_tp=st.sampled_from([1, 2, 4]),
    heads=st.sampled_from([4, 8]),
    head_dim=st.integers(1, 4),
    n_inner=st.none() | st.integers(3, 24),
    vocab=st.integers(100, 600),
    seed=st.integers(0, 3),
)
def test_round_trip_is_bit_exact_and_keeps_the_tie(
    src_tp, dst_tp, heads, head_dim, n_inner, vocab, seed
):
    model = gpt2(vocab=vocab, heads=heads, head_dim=head_dim, n_inner=n_inner, seed=seed)
    cfg = RefitModelConfig.from_hf(model.config)
    hf = model.state_dict()
    out, _ = roundtrip(hf, cfg, src_tp=src_tp, dst_tp=dst_tp)
    assert_same_state(out, hf)
    assert out["lm_head.weight"] is out["transformer.wte.weight"]


def test_untied_gpt2_round_trips_its_own_lm_head():
    model = gpt2(tied=False)
    cfg = RefitModelConfig.from_hf(model.config)
    hf = model.state_dict()
    assert not torch.equal(hf["lm_head.weight"], hf["transformer.wte.weight"])
    out, _ = roundtrip(hf, cfg, src_tp=2, dst_tp=4)
    assert_same_state(out, hf)
    assert out["lm_head.weight"] is not out["transformer.wte.weight"]


def test_logits_of_a_gpt2_loaded_from_the_translation_are_bit_exact():
    trainer, receiver = gpt2(layers=2, seed=1), gpt2(layers=2, seed=2)
    prompt = fixed_prompt(trainer.config.vocab_size)
    with torch.no_grad():
        want = trainer(prompt).logits
        assert not torch.equal(receiver(prompt).logits, want)
        out, _ = roundtrip(
            trainer.state_dict(),
            RefitModelConfig.from_hf(trainer.config),
            src_tp=2,
            dst_tp=1,
        )
        # assign=True: parameters become the translated tensors, so the tie survives only if
        # lm_head.weight is the embedding tensor itself (a copy would untie them)
        receiver.load_state_dict(out, assign=True)
        assert torch.equal(receiver(prompt).logits, want)
    head, wte = receiver.lm_head.weight, receiver.transformer.wte.weight
    assert head.data_ptr() == wte.data_ptr()
