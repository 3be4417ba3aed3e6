"""Planner benchmark: an 18,867-tensor Qwen3-30B-A3B-like manifest from TP 4 to TP 8.

The tensor list follows the HF form of that model (48 layers, 128 experts with separate
gate/up/down, q/k norms): 48 * (128 * 3 + 9) + 3 = 18,867 tensors, sharded Megatron-style over
4 trainer ranks. Goals: cold plan <= 1 s, cached plan lookup <= 1 ms.
"""

from __future__ import annotations

import pathlib
import statistics
import time

from mx_reference.refit import PlanCache, ShardDescriptor, TargetLayout, plan_refit
from mx_reference.refit.layouts import tp_range, vocab_range
from mx_reference.refit.wire import make_manifest
from mx_sim.report import BenchResult

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, EXPERTS, VOCAB = 2048, 32, 4, 128, 768, 128, 151936


def _tensors(layers: int) -> list[tuple[str, tuple[int, ...], str, dict]]:
    """(name, global shape, style, extra descriptor fields) of the whole model."""
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "vocab_parallel", {})]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,), "replicated", {}),
            (p + "post_attention_layernorm.weight", (HIDDEN,), "replicated", {}),
            (p + "self_attn.q_norm.weight", (HEAD_DIM,), "replicated", {}),
            (p + "self_attn.k_norm.weight", (HEAD_DIM,), "replicated", {}),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), "column", {}),
            (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "column", {}),
            (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "column", {}),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), "row", {}),
            (p + "mlp.gate.weight", (EXPERTS, HIDDEN), "replicated", {}),
        ]
        for e in range(EXPERTS):
            ex = {"expert_ids": (e,), "num_experts": EXPERTS}
            q = f"{p}mlp.experts.{e}."
            out += [
                (q + "gate_proj.weight", (FFN, HIDDEN), "column", ex),
                (q + "up_proj.weight", (FFN, HIDDEN), "column", ex),
                (q + "down_proj.weight", (HIDDEN, FFN), "row", ex),
            ]
    out += [
        ("model.norm.weight", (HIDDEN,), "replicated", {}),
        ("lm_head.weight", (VOCAB, HIDDEN), "vocab_parallel", {}),
    ]
    return out


def build_manifests(layers: int, tp: int) -> list:
    """One bf16 manifest per trainer TP rank (descriptors only, no tensors)."""
    tensors = _tensors(layers)
    manifests = []
    for rank in range(tp):
        descs, offset = [], 0
        for name, shape, style, extra in tensors:
            axis = 1 if style == "row" else 0
            rng = None
            local = list(shape)
            if style != "replicated":
                rng = (
                    vocab_range(shape[0], tp, rank)
                    if style == "vocab_parallel"
                    else tp_range(shape[axis], tp, rank)
                )
                local[axis] = rng[1] - rng[0]
            nbytes = 2 * local[0] * (local[1] if len(local) > 1 else 1)
            d = ShardDescriptor(
                name=name, global_shape=shape, dtype="bfloat16", style=style,
                placement="replicate" if rng is None else "shard", shard_axis=axis,
                shard_range=rng, nbytes=nbytes, offset=offset, **extra,
            )  # fmt: skip
            descs.append(d)
            offset += nbytes
        manifests.append(make_manifest("qwen3-30b-a3b-like", 1, descs, tp=(rank, tp)))
    return manifests


def run(out_dir: pathlib.Path, quick: bool) -> list[BenchResult]:
    layers = 2 if quick else 48
    manifests = build_manifests(layers, tp=4)
    target = TargetLayout(tp_size=8, tp_rank=0)
    colds = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        plan = plan_refit(manifests, target).require_complete()
        colds.append(time.perf_counter() - t0)
    cache = PlanCache()
    cache.get(manifests, target)
    lookups = []
    for _ in range(200 if quick else 2000):
        t0 = time.perf_counter()
        cache.get(manifests, target)
        lookups.append(time.perf_counter() - t0)
    pieces = [p for t in plan.tensors.values() for p in t.pieces]
    cold, hit = min(colds), statistics.median(lookups)
    return [
        BenchResult(
            name="planner/qwen3-30b-a3b-like tp4->tp8",
            metrics={
                "tensors": float(len(manifests[0].tensors)),
                "planned_tensors": float(len(plan.tensors)),
                "pieces": float(len(pieces)),
                "direct_fraction": sum(p.direct for p in pieces) / len(pieces),
                "cold_plan_s": cold,
                "cached_lookup_ms": hit * 1e3,
            },
            goals={"cold_plan_s": "<= 1 s for 18,867 tensors", "cached_lookup_ms": "<= 1 ms"},
            met=cold <= 1.0 and hit <= 1e-3,
            notes=("quick: 2 layers only; " if quick else "")
            + "cold = best of fresh plan_refit calls for target rank 0 of 8",
        )
    ]
