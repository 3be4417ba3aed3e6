"""Real Megatron-Core trainer ranks on CPU: the project's HF -> Megatron conversion loaded into
Megatron-Core gives HF's logits and gradients (Llama at TP 1, 2, 4 and PP 2; DeepSeek-V3's MLA
and sigmoid-routed MoE at TP 1, 2, EP 2 and EP2 x TP2), and a plain-``cat`` QKV or a halved
global ``[gate; up]`` is caught; Megatron's own parameters map onto the HF-split trainer's
descriptors."""

from __future__ import annotations

import copy
import uuid

import msgspec
import pytest
import torch
import torch.nn.functional as F

from mx_reference.refit import layouts
from mx_reference.refit.layouts import RefitModelConfig
from mx_reference.refit.name_maps import WORD_EMBEDDINGS
from mx_sim.cluster.launch import host_store, launch
from mx_sim.cluster.topology import TopologySpec
from mx_sim.fixtures import TinyModelSpec, build_tiny_model, fixed_prompt, rank_shards
from mx_sim.refit.megatron_trainer import (
    MegatronModelSpec,
    loaded_logits_and_grads,
    megatron_available,
    training_batch,
)

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.xdist_group("refit-sim"),
    pytest.mark.skipif(not megatron_available(), reason="megatron-core not installed"),
]

GQA = TinyModelSpec()  # 4 heads in 2 groups: a plain cat of q|k|v is wrong
MHA4 = TinyModelSpec(num_kv_heads=4)  # TP 4 needs 4 query groups


def _hf_reference(kind: str, spec: TinyModelSpec):
    """An HF model, its logits on the fixed prompt and the gradients of the mean next-token
    loss on the training batch (the same loss the Megatron rank takes)."""
    model = build_tiny_model(kind, spec, seed=7)
    logits = model(fixed_prompt(spec.vocab_size)).logits
    batch, labels = training_batch(spec.vocab_size)
    out = model(batch).logits
    F.cross_entropy(out.flatten(0, 1), labels.flatten()).backward()
    grads = {
        n: p.grad for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None
    }
    return model, logits.detach(), grads


def _shards(state, cfg, topology):
    return [
        rank_shards(
            state,
            cfg,
            tp=(i.tp_rank, i.tp_size),
            pp=(i.pp_rank, i.pp_size),
            ep=(i.ep_rank, i.ep_size),
        )
        for i in topology.ranks()[: topology.num_trainers]
    ]


def _run(kind, spec, topology, model):
    cfg = RefitModelConfig.from_hf(model.config)
    state = {n: t.detach() for n, t in model.state_dict().items()}
    shards = _shards(state, cfg, topology)
    master, addr = host_store(f"diff-{uuid.uuid4().hex[:8]}")
    outcomes = launch(
        loaded_logits_and_grads,
        topology.num_trainers,
        (kind, spec, topology, shards, addr),
        timeout_s=90,
    )
    del master
    assert all(o.status == "ok" for o in outcomes), [o.error for o in outcomes]
    results = []
    for o in outcomes:
        logits, grads = o.value
        logits = None if logits is None else torch.from_numpy(logits)
        results.append((logits, [(d, torch.from_numpy(g)) for d, g in grads]))
    return cfg, results


def _check_logits_and_grads(kind, spec, topology, *, grads_too=True):
    """Load HF's weights into Megatron ranks of ``topology``: every last-stage rank's logits
    within 1e-5 of HF's; each rank's own descriptors equal to the HF-split trainer's; and
    (``grads_too``) its gradients within 1e-4 relative of that trainer's shards of HF's
    gradients. Returns the largest logits difference."""
    model, want, grads = _hf_reference(kind, spec)
    cfg, results = _run(kind, spec, topology, model)
    last = [lg for lg, _ in results if lg is not None]  # every TP (and EP) rank of the last stage
    assert len(last) == topology.trainer_tp * topology.trainer_ep
    worst = max((logits - want).abs().max().item() for logits in last)
    assert worst <= 1e-5  # TP all-reduce order: within 1e-5, not bit-exact
    # HF's padding_idx row gets no gradient (it is frozen); Megatron's embedding has no such row
    pad = getattr(model.config, "pad_token_id", None)
    want_grads = _shards(grads, cfg, topology)
    trainers = topology.ranks()[: topology.num_trainers]
    for info, (_, got), expected in zip(trainers, results, want_grads, strict=True):
        # the same descriptors (but for their offsets in the HF-split trainer's region)
        expected = {d.name: (msgspec.structs.replace(d, offset=0), t) for d, t in expected}
        assert {d.name: d for d, _ in got} == {n: d for n, (d, _) in expected.items()}
        for d, g in got if grads_too else ():
            e = expected[d.name][1]
            lo, hi = d.shard_range or (0, d.global_shape[0])
            if d.name == WORD_EMBEDDINGS and pad is not None and lo <= pad < hi:
                g = g.clone()
                g[pad - lo] = e[pad - lo]
            err = (g - e).abs().max().item() / (e.abs().max().item() or 1.0)
            assert err <= 1e-4, (info.global_rank, d.name, err)
    return worst


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("spec", "tp", "pp"),
    [(GQA, 1, 1), (GQA, 2, 1), (MHA4, 4, 1), (GQA, 1, 2)],
    ids=["tp1", "tp2", "tp4", "pp2"],
)
def test_converted_checkpoint_gives_hf_logits_and_gradients(spec, tp, pp):
    _check_logits_and_grads("llama", spec, TopologySpec(trainer_tp=tp, trainer_pp=pp))


# DeepSeek-V3: MLA, a dense first layer, a sigmoid-routed MoE layer with a shared expert. At
# TP > 1 Megatron's MoE backward is not the model's gradient without sequence parallelism
# (the allgather dispatcher hands every expert each token once per TP rank), so there only
# the logits are compared.
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("tp", "ep", "grads_too"),
    [(1, 1, True), (2, 1, False), (1, 2, True), (2, 2, False)],
    ids=["tp1", "tp2", "ep2", "ep2xtp2"],
)
def test_deepseek_v3_checkpoint_gives_hf_logits_and_gradients(tp, ep, grads_too):
    topology = TopologySpec(trainer_tp=tp, trainer_ep=ep)
    worst = _check_logits_and_grads("deepseek_v3", GQA, topology, grads_too=grads_too)
    print(f"deepseek_v3 TP{tp} x EP{ep}: Megatron logits within {worst:.3g} of HF's")


@pytest.mark.parametrize(
    ("field", "value"),
    [("rope_interleave", False), ("norm_topk_prob", False), ("rope_parameters.rope_type", "yarn")],
)
def test_deepseek_v3_configs_megatron_computes_otherwise_are_refused(field, value):
    MegatronModelSpec("deepseek_v3", GQA).check(2, 1, 2)  # the tiny config runs
    spec = MegatronModelSpec("deepseek_v3", GQA)
    config = copy.deepcopy(spec.hf_config)
    if field == "rope_parameters.rope_type":
        config.rope_parameters = {**config.rope_parameters, "rope_type": value}
    else:
        setattr(config, field, value)
    spec.__dict__["hf_config"] = config  # the cached property, replaced
    with pytest.raises(ValueError, match=f"deepseek_v3 {field}: not run through Megatron-Core"):
        spec.check(1, 1)


def _plain_cat(q, k, v, *, num_heads, num_kv_heads):
    return torch.cat([q, k, v])  # the bug: no per-group interleave


_CUT = layouts.shard_from_canonical


def _halved(d, full, tp, rank, **kw):
    if d.style == "gated_mlp_column":
        return full.chunk(tp)[rank]  # the bug: rank r takes a chunk of the global [gate; up]
    return _CUT(d, full, tp, rank, **kw)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("target", "bug"), [("megatron_qkv_from_hf", _plain_cat), ("shard_from_canonical", _halved)]
)
def test_differential_check_catches_conversion_bugs(target, bug, monkeypatch):
    topology = TopologySpec(trainer_tp=2)
    model, want, _ = _hf_reference("llama", GQA)
    monkeypatch.setattr(layouts, target, bug)
    _, results = _run("llama", GQA, topology, model)
    logits = next(lg for lg, _ in results if lg is not None)
    err = (logits - want).abs().max().item()
    print(f"{target} bug: Megatron logits off HF's by {err:.3g}")
    assert err > 1e-2  # a thousand times the tolerance a correct conversion meets
