"""Every tiny model family refits bit for bit (every tensor A -> B, logits equal) from trainers
at TP 1, 2, 4 and 8, into one rank and into a TP2 replica: Phi-3's fused q|k|v and gate|up,
OLMo2's post-norms, Gemma 2/3's norms on both sides of each block among them."""

from __future__ import annotations

import pytest

from mx_reference.refit.name_maps import RefitModelConfig
from mx_reference.refit.planner import TargetLayout
from mx_reference.transport.nixl import nixl_available
from mx_sim.fixtures import MODEL_BUILDERS, TinyModelSpec, build_tiny_model, version_model
from mx_sim.refit.ranks import ReceiverRank
from mx_sim.refit.rig import RefitRig, Replica, RigConfig

FAMILIES = [k for k in MODEL_BUILDERS if k not in ("gpt2", "mixtral")]  # GPT-2, MoE: the matrix
WIDE = TinyModelSpec(num_heads=8, num_kv_heads=8)  # heads for a TP8 trainer


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("trainer_tp", [1, 2, 4, 8])
def test_family_refits_bit_exactly_from_every_trainer_tp(kind, trainer_tp):
    spec = WIDE if trainer_tp > 2 else TinyModelSpec()
    with RefitRig(RigConfig(kind, spec, trainer_tp=trainer_tp)) as rig, Replica(2) as replica:
        one = version_model(kind, spec, 0)
        ranks = [ReceiverRank(rig.new_receiver(one), one, rig.weights)]
        pair = [version_model(kind, spec, 0) for _ in range(2)]
        receivers = [
            rig.new_receiver(m, target=TargetLayout(tp_size=2, tp_rank=r), group=replica.groups[r])
            for r, m in enumerate(pair)
        ]
        ranks += [ReceiverRank(rx, m, rig.weights) for rx, m in zip(receivers, pair, strict=True)]
        for v in (1, 2):
            rig.publish(v)
            _, problems = ranks[0].cycle(v)
            assert not problems, problems
            results = replica.map(lambda r: ranks[1 + r].cycle(v, logits=r == 1))  # noqa: B023
            assert not [p for _, ps in results for p in ps]


@pytest.mark.parametrize(
    ("kind", "norms", "fused", "qk_norm"),
    [
        ("llama", "pre", False, False),
        ("phi3", "pre", True, False),
        ("olmo2", "post", False, True),
        ("gemma", "pre", False, False),
        ("gemma2", "sandwich", False, False),
        ("gemma3", "sandwich", False, True),
    ],
)
def test_from_hf_reads_each_familys_layout(kind, norms, fused, qk_norm):
    cfg = RefitModelConfig.from_hf(build_tiny_model(kind).config)
    assert (cfg.norms, cfg.fused, cfg.qk_norm) == (norms, fused, qk_norm)


@pytest.mark.skipif(not nixl_available(), reason="nixl wheel not installed")
@pytest.mark.timeout(120)
def test_every_family_refits_over_real_nixl():
    """The same bytes over NIXL's UCX backend: each family, trainer TP2 -> one rank, twice."""
    for kind in MODEL_BUILDERS:
        with RefitRig(RigConfig(kind, trainer_tp=2, transport="nixl")) as rig:
            model = version_model(kind, None, 0)
            rank = ReceiverRank(rig.new_receiver(model), model, rig.weights)
            for v in (1, 2):
                rig.publish(v)
                _, problems = rank.cycle(v)
                assert not problems, (kind, problems)
