"""Shared by the refit-core tests: synthetic HF state dicts and the full round trip
HF -> Megatron shards at S -> plan + assemble at T -> HF."""

from __future__ import annotations

import torch

from mx_reference.refit.layouts import (
    RefitModelConfig,
    canonical_from_ranks,
    hf_from_canonical,
    megatron_shards_from_hf,
)
from mx_reference.refit.planner import TargetLayout, assemble, plan_refit
from mx_reference.refit.wire import make_manifest


def synthetic_hf(cfg: RefitModelConfig, *, dtype=torch.float32, seed: int = 0) -> dict:
    """Random tensors under the HF names and shapes a Llama/Qwen/Mixtral-style model uses."""
    g = torch.Generator().manual_seed(seed)
    h, d, i, e = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.num_experts
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
        }
        if cfg.qkv_bias:
            for x, rows in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
                shapes[p + f"self_attn.{x}_proj.bias"] = (rows * d,)
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if e:
            shapes |= {
                p + "mlp.gate.weight": (e, h),
                p + "mlp.experts.gate_up_proj": (e, 2 * i, h),
                p + "mlp.experts.down_proj": (e, h, i),
            }
        else:
            shapes |= {
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
    sd = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def publish_all(hf, cfg, *, tp: int, ep: int = 1, layout: str = "per_expert", version: int = 1):
    """Every trainer rank's manifest and shards: ``(manifests, {rank: {name: tensor}})``."""
    manifests, shards = [], {}
    for e in range(ep):
        for k in range(tp):
            out = megatron_shards_from_hf(
                hf, cfg, tp_size=tp, tp_rank=k, ep_size=ep, ep_rank=e, expert_layout=layout
            )
            m = make_manifest("m", version, [d for d, _ in out], tp=(k, tp), ep=(e, ep))
            manifests.append(m)
            shards[m.rank] = {d.name: t for d, t in out}
    return manifests, shards


def roundtrip(hf, cfg, *, src_tp, dst_tp, src_ep=1, dst_ep=1, layout="per_expert"):
    """Run the whole path; returns ``(hf_out, plans)``. Asserts every destination element of
    every target rank is written exactly once."""
    manifests, shards = publish_all(hf, cfg, tp=src_tp, ep=src_ep, layout=layout)
    ranks, specs, plans = {}, {}, []
    for e in range(dst_ep):
        for t in range(dst_tp):
            target = TargetLayout(tp_size=dst_tp, tp_rank=t, ep_size=dst_ep, ep_rank=e)
            plan = plan_refit(manifests, target).require_complete()
            plans.append(plan)
            ranks[(t, e)] = assemble(plan, shards)
            for name, tensor_plan in plan.tensors.items():
                specs[name] = tensor_plan.spec
                count = torch.zeros(tensor_plan.dst_shape, dtype=torch.int32)
                for piece in tensor_plan.pieces:
                    piece.dst_view(count).add_(1)
                assert bool((count == 1).all()), f"{name}: destination not written exactly once"
    canonical = canonical_from_ranks(ranks, specs, tp_size=dst_tp, ep_size=dst_ep)
    return hf_from_canonical(canonical, cfg, layout), plans
