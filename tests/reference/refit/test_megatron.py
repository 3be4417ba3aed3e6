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


def _megatron_params(tp: int, rank: int, *, local_spec: bool, offset: int = 0):
    """What Megatron rank ``rank`` of ``tp`` holds: its shards, padded vocab rows, names local
    to a stage starting at layer ``offset``."""
    out = []
    for d, t in megatron_shards_from_hf(CFG_MODEL.state_dict(), CFG, tp_size=tp, tp_rank=rank):
        name = d.name
        if d.style == "vocab_parallel":
            rows = padded_vocab_size(CFG.vocab_size, tp) // tp
            t = torch.cat([t, torch.zeros(rows - t.shape[0], *t.shape[1:])])
        if name.startswith("decoder.layers."):
            layer, rest = name.removeprefix("decoder.layers.").split(".", 1)
            if local_spec:
                rest = TE_NAMES.get(rest, rest)
            name = f"decoder.layers.{int(layer) - offset}.{rest}"
        out.append((name, t))
    return out


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
