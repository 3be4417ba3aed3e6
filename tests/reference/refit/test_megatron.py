"""Megatron-Core parameter names and local shards -> descriptors (no Megatron needed: the
parameters are built here the way a Megatron rank holds them)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mx_reference.refit.layouts import (
    RefitModelConfig,
    megatron_shards_from_hf,
    padded_vocab_size,
)
from mx_reference.refit.megatron import LOCAL_SPEC_NORMS, canonical_name, shards_from_megatron
from mx_sim.fixtures import build_tiny_model

CFG_MODEL = build_tiny_model("llama")
CFG = RefitModelConfig.from_hf(CFG_MODEL.config)
TE_NAMES = {v: k for k, v in LOCAL_SPEC_NORMS.items()}


def _megatron_params(
    tp: int, rank: int, *, local_spec: bool, offset: int = 0, model=CFG_MODEL, ep=(0, 1)
):
    """What Megatron rank ``rank`` of ``tp`` (and ``ep``) holds: its shards, padded vocab rows,
    names local to a stage starting at layer ``offset``, experts numbered from 0 on each EP
    rank."""
    cfg = RefitModelConfig.from_hf(model.config)
    out = []
    first_expert = cfg.num_experts // ep[1] * ep[0]
    for d, t in megatron_shards_from_hf(
        model.state_dict(), cfg, tp_size=tp, tp_rank=rank, ep_size=ep[1], ep_rank=ep[0]
    ):
        name = d.name
        if d.style == "vocab_parallel":
            rows = padded_vocab_size(cfg.vocab_size, tp) // tp
            t = torch.cat([t, torch.zeros(rows - t.shape[0], *t.shape[1:])])
        if name.startswith("decoder.layers."):
            layer, rest = name.removeprefix("decoder.layers.").split(".", 1)
            if local_spec:
                rest = TE_NAMES.get(rest, rest)
            if d.expert_ids:
                e = d.expert_ids[0]
                rest = rest.replace(f"local_experts.{e}.", f"local_experts.{e - first_expert}.")
            name = f"decoder.layers.{int(layer) - offset}.{rest}"
        out.append((name, t))
    return out


def _facts(shards):
    return [
        (d.name, d.global_shape, d.style, d.shard_range, d.nbytes, d.expert_ids, d.num_experts)
        for d, _ in shards
    ]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize(("tp", "ep"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_moe_experts_are_renumbered_per_ep_rank(kind, tp, ep):
    """Megatron numbers each EP rank's experts from 0; shared experts, their gate, dense
    layers' fused norms (Qwen3-MoE's layer 0) map like the HF-split trainer's."""
    model = build_tiny_model(kind)
    cfg = RefitModelConfig.from_hf(model.config)
    for ep_rank in range(ep):
        for rank in range(tp):
            want = megatron_shards_from_hf(
                model.state_dict(), cfg, tp_size=tp, tp_rank=rank, ep_size=ep, ep_rank=ep_rank
            )
            params = _megatron_params(tp, rank, local_spec=True, model=model, ep=(ep_rank, ep))
            got = shards_from_megatron(params, cfg, tp=(rank, tp), ep=(ep_rank, ep))
            assert _facts(got) == _facts(want)
            for (_, w), (_, g) in zip(want, got, strict=True):
                assert torch.equal(w, g)


@pytest.mark.parametrize("local_spec", [True, False], ids=["local spec", "TE spec"])
@pytest.mark.parametrize("tp", [1, 2])
def test_both_naming_schemes_give_the_reference_descriptors(local_spec, tp):
    for rank in range(tp):
        want = megatron_shards_from_hf(CFG_MODEL.state_dict(), CFG, tp_size=tp, tp_rank=rank)
        params = _megatron_params(tp, rank, local_spec=local_spec)
        got = shards_from_megatron(params, CFG, tp=(rank, tp))
        strip = [(d.name, d.global_shape, d.style, d.shard_range, d.nbytes) for d, _ in want]
        assert [(d.name, d.global_shape, d.style, d.shard_range, d.nbytes) for d, _ in got] == strip
        for (_, w), (_, g) in zip(want, got, strict=True):
            assert torch.equal(w, g)  # padding rows dropped, bytes are the parameters'


def test_stage_local_layer_numbers_become_global():
    assert canonical_name("decoder.layers.0.input_layernorm.weight", CFG, layer_offset=1) == (
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    )
    moe = RefitModelConfig.from_hf(build_tiny_model("mixtral").config)
    assert canonical_name("decoder.layers.0.pre_mlp_layernorm.weight", moe) == (
        "decoder.layers.0.pre_mlp_layernorm.weight"
    )


def test_unmapped_or_misshapen_parameters_are_refused_naming_them():
    params = _megatron_params(2, 0, local_spec=True)
    with pytest.raises(ValueError, match="'decoder.layers.0.mlp.extra.weight'.*no descriptor"):
        shards_from_megatron(
            [*params, ("decoder.layers.0.mlp.extra.weight", torch.zeros(2))], CFG, tp=(0, 2)
        )
    name, t = next((n, t) for n, t in params if n.endswith("linear_qkv.weight"))
    bad = [(n, t[:-16] if n == name else t) for n, t in params]
    with pytest.raises(
        ValueError, match=f"{name}.*makes 96 global rows at TP 2, the config needs 128"
    ):
        shards_from_megatron(bad, CFG, tp=(0, 2))
    other_padding = dataclasses.replace(CFG, vocab_divisible_by=64)  # not Megatron's 128
    with pytest.raises(ValueError, match="128 vocab rows per rank, but vocab 128 pads to 128"):
        shards_from_megatron(params, other_padding, tp=(0, 2))
