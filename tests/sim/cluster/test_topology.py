"""Topology spec: rank mapping, groups, planning-only mode for 256 ranks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mx_sim.cluster.topology import TopologySpec
from mx_sim.fixtures import TinyModelSpec, pp_stage
from mx_sim.refit.planning import plan_topology

sizes = st.integers(1, 4)


@given(sizes, sizes, sizes, sizes, sizes, st.integers(1, 3))
def test_rank_info_is_a_bijection_with_groups_partitioning_ranks(ttp, tpp, tep, itp, ipp, reps):
    spec = TopologySpec(ttp, tpp, tep, itp, ipp, reps)
    infos = spec.ranks()
    assert [i.global_rank for i in infos] == list(range(spec.world_size))
    trainers = [i for i in infos if i.role == "trainer"]
    coords = {(i.tp_rank, i.pp_rank, i.ep_rank) for i in trainers}
    assert len(coords) == len(trainers) == ttp * tpp * tep
    receivers = [i for i in infos if i.role == "receiver"]
    assert {(i.replica, i.tp_rank, i.pp_rank) for i in receivers} == {
        (r, t, p) for r in range(reps) for t in range(itp) for p in range(ipp)
    }
    for kind in ("tp", "pp"):
        groups = {tuple(spec.groups_of(i.global_rank)[kind]) for i in trainers}
        assert sorted(r for g in groups for r in g) == list(range(spec.num_trainers))
    for i in infos:
        for members in spec.groups_of(i.global_rank).values():
            assert i.global_rank in members


def test_one_rank_order_megatrons_tp_then_ep_then_pp_in_every_rig():
    # TP1 x PP2 x EP2: rank 1 is the second EP rank of stage 0, rank 2 the first of stage 1;
    # the in-process rig (and so the conformance checks) numbers its trainers the same way
    from mx_sim.refit.rig import RefitRig, RigConfig

    spec = TopologySpec(trainer_pp=2, trainer_ep=2)
    coords = [(i.pp_rank, i.ep_rank, i.tp_rank) for i in spec.ranks()[:4]]
    assert coords == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    with RefitRig(RigConfig("mixtral", trainer_pp=2, trainer_ep=2)) as rig:
        assert [t.info for t in rig.trainers] == spec.ranks()[:4]


def test_tp_rank_differs_from_global_rank_under_pp_and_for_receivers():
    spec = TopologySpec(trainer_tp=2, trainer_pp=2, inference_tp=4)
    assert spec.label() == "PP2xTP2->TP4"
    assert spec.rank_info(2).tp_rank == 0 and spec.rank_info(2).pp_rank == 1
    assert [spec.rank_info(r).tp_rank for r in range(4, 8)] == [0, 1, 2, 3]
    assert spec.groups_of(5) == {"replica": [4, 5, 6, 7]}


@pytest.mark.parametrize("field", ["trainer_tp", "inference_tp", "replicas"])
def test_bad_topology_names_the_field(field):
    with pytest.raises(ValueError, match=field):
        TopologySpec(**{field: 0})
    with pytest.raises(ValueError, match="outside world"):
        TopologySpec().rank_info(2)


def test_pp_stage_splits_layers_evenly():
    assert pp_stage("embedding.word_embeddings.weight", 4, 2) == 0
    assert pp_stage("decoder.layers.1.mlp.linear_fc1.weight", 4, 2) == 0
    assert pp_stage("decoder.layers.2.mlp.linear_fc1.weight", 4, 2) == 1
    assert pp_stage("output_layer.weight", 4, 2) == 1


def test_planning_only_mode_covers_256_trainer_ranks():
    spec = TopologySpec(trainer_tp=8, trainer_pp=4, trainer_ep=8, inference_tp=8, replicas=2)
    model = TinyModelSpec(num_layers=4, num_heads=8, num_kv_heads=8, num_experts=8)
    out = plan_topology(spec, "mixtral", model)
    assert out["trainers"] == 256 and out["receivers"] == 16
    per_replica = out["bytes_per_receiver"][:8]
    assert per_replica == out["bytes_per_receiver"][8:]  # replicas plan identically
    assert all(b > 0 for b in per_replica)
