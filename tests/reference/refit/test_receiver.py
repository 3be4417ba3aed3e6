"""Refit data plane in one process: publisher, receiver, apply, poller, replicas (real transports)."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import torch
import torch.distributed as dist

from mx_reference.backends import CudaBackend
from mx_reference.graphs.ledger import diff_ledgers, module_address_ledger
from mx_reference.refit.apply import check_staged, model_digest, model_parameters
from mx_reference.refit.layouts import Regrouped, megatron_shards_from_hf
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.poller import EngineGate, RefitPoller
from mx_reference.refit.publisher import PublisherConfig, RefitPublisher
from mx_reference.refit.receiver import RefitError, RefitReceiver, StaleVersion
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.replicas import ReplicaSource
from mx_reference.refit.wire import decode_endpoint, make_manifest
from mx_sim.cluster.topology import TopologySpec
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import VersionWeights, fixed_prompt, version_model
from mx_sim.refit.faults import Fault
from mx_sim.refit.ranks import MODEL_ID, HfSplitShards, TrainerRank, receiver_for
from mx_sim.refit.rig import RefitRig, RigConfig
from mx_sim.sim_transport import SimTransport, make_transport


@pytest.fixture
def rig_factory():
    rigs = []

    def make(**kw) -> RefitRig:
        post_load = kw.pop("post_load", None)
        rig = RefitRig(RigConfig(**kw), post_load=post_load)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model_parameters(model).items()}


@pytest.mark.parametrize(
    "kind,trainer_tp,trainer_ep",
    [("llama", 1, 1), ("llama", 2, 1), ("qwen2", 2, 1), ("mixtral", 1, 2)],
)
def test_three_cycles_exact_in_place_and_warm(rig_factory, kind, trainer_tp, trainer_ep):
    rig = rig_factory(model_kind=kind, trainer_tp=trainer_tp, trainer_ep=trainer_ep)
    backend = CpuMockBackend()
    ledger = module_address_ledger(rig.model, backend=backend)
    previous = _params(rig.model)
    prompt = fixed_prompt(rig.model.config.vocab_size)
    timings = []
    for version in (1, 2, 3):
        before = _params(rig.model)
        timings.append(rig.cycle(version))
        oracle = {n: t for n, t in rig.version_state(version).items() if n in before}
        for name, now in model_parameters(rig.model).items():
            assert torch.equal(before[name], previous[name]), name  # before == A
            assert torch.equal(now, oracle[name]), name  # after == B
            assert not torch.equal(previous[name], oracle[name]), name  # A != B
        previous = _params(rig.model)
        trainer = rig.version_state(version)
        reference = type(rig.model)(rig.model.config).eval()
        reference.load_state_dict(trainer)
        assert torch.equal(rig.model(prompt).logits, reference(prompt).logits)
        assert not diff_ledgers(ledger, module_address_ledger(rig.model, backend=backend))
    cold, *warm = timings
    assert cold.registrations >= 1 and cold.bytes_allocated > 0 and not cold.plan_cache_hit
    for t in warm:
        assert (t.registrations, t.bytes_allocated, t.alloc, t.register) == (0, 0, 0.0, 0.0)
        assert t.plan_cache_hit and t.bytes_pulled == cold.bytes_pulled
    # trainers register one arena per live version, reused after retirement
    assert all(p.stats.registrations == 2 for p in rig.publishers)


def test_receiver_reads_each_source_on_the_device_its_endpoint_names():
    # a trainer arena on device 1 (cuda:1 on hardware): every read must name device 1. A
    # receiver that rebuilt its remote descriptors without the endpoint's device id read
    # "device 0", where the source has no such region (the SimTransport agent enforces it).
    weights = VersionWeights()
    registry = VersionRegistry(dist.HashStore(), timeout=5.0)
    info = TopologySpec().rank_info(0)
    on_device_1 = SimTransport("trainer-dev1", device_id=1)
    trainer = TrainerRank(info, registry, on_device_1, HfSplitShards(weights, info))
    model = version_model("llama", None, 0)
    agent = SimTransport("receiver-dev0")
    receiver = receiver_for(
        model,
        registry=registry,
        transport=agent,
        target=TargetLayout(),
        timeout_s=5.0,
        backend=CpuMockBackend(),
    )
    try:
        (manifest,) = [trainer.publish(1)]
        assert decode_endpoint(manifest.agent_metadata).device_id == 1
        receiver.refit(1)
        want = weights.params(1)
        assert all(torch.equal(p, want[n]) for n, p in model_parameters(model).items())
    finally:
        receiver.close()
        agent.close()
        trainer.close()


def test_row_parallel_scratch_pieces_are_rewritten_every_cycle(rig_factory):
    # target narrower than the source: row-parallel (axis 1) destination slices are strided,
    # so those tensors go through scratch; a stale scratch buffer would show up in cycle 2 or 3
    rig = rig_factory(trainer_tp=2)
    rig.cycle(1)
    plan = next(iter(rig.receiver.plans._plans.values()))
    scratch = [n for n, t in plan.tensors.items() if t.assembly == "scratch"]
    assert any("linear_proj" in n for n in scratch)
    for version in (2, 3):
        rig.cycle(version)
        state = rig.version_state(version)
        o_proj = "model.layers.0.self_attn.o_proj.weight"
        assert torch.equal(rig.receiver.params[o_proj], state[o_proj])


def test_matched_layout_translates_into_views_and_apply_makes_the_only_copy(rig_factory):
    rig = rig_factory()  # TP1 -> TP1, two KV groups: q, k and v are strided in the pulled QKV
    rig.publish(1)
    staged = rig.receiver.stage(1)
    (dest,) = [a for key, a in rig.receiver.buffers._arenas.items() if key[0] == "dest"]
    pulled = dest.buffer.untyped_storage().data_ptr()
    entries = staged.tensors.entries
    assert any(isinstance(e, Regrouped) for e in entries.values())
    for name, entry in entries.items():
        source = entry.source if isinstance(entry, Regrouped) else entry
        assert source.untyped_storage().data_ptr() == pulled, name
    rig.receiver.commit(staged)
    state = rig.version_state(1)
    for name, param in rig.receiver.params.items():
        assert torch.equal(param, state[name]), name


@pytest.mark.parametrize(
    "kind,error", [("corrupt_shard", "digest mismatch"), ("read_failed", "injected failure")]
)
def test_failed_cycle_leaves_model_untouched_and_next_cycle_recovers(rig_factory, kind, error):
    calls = []
    fault = Fault(kind, cycle=2, rank=1)
    rig = rig_factory(trainer_tp=2, fault=fault, post_load=calls.append)
    rig.cycle(1)
    digest = model_digest(rig.model)
    with pytest.raises(RefitError, match=error):
        rig.cycle(2)
    assert model_digest(rig.model) == digest and rig.receiver.applied_version == 1
    assert len(calls) == 1  # post-load ran for the good apply only
    rig.cycle(3)
    assert rig.receiver.applied_version == 3 and len(calls) == 2


def test_post_load_hook_runs_once_per_apply_and_is_rerunnable(rig_factory):
    fused: dict[str, torch.Tensor] = {}
    runs = []

    def rebuild(model):  # e.g. a fused gate/up layout derived from the loaded weights
        mlp = model.model.layers[0].mlp
        fused["gate_up"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().clone()
        runs.append(1)

    rig = rig_factory(post_load=rebuild)
    for version in (1, 2, 3):
        rig.cycle(version)
        state = rig.version_state(version)
        want = torch.cat(
            [
                state["model.layers.0.mlp.gate_proj.weight"],
                state["model.layers.0.mlp.up_proj.weight"],
            ]
        )
        assert torch.equal(fused["gate_up"], want) and len(runs) == version


def test_stale_versions_are_refused(rig_factory):
    rig = rig_factory(timeout_s=0.5)
    rig.cycle(1)
    rig.cycle(2)
    with pytest.raises(StaleVersion):
        rig.receiver.stage(2)
    with pytest.raises(StaleVersion, match="newest committed version 2"):
        rig.receiver.refit(3)  # nobody publishes 3


def test_apply_checks_everything_before_writing(rig_factory):
    rig = rig_factory()
    params = rig.receiver.params
    good = {n: p.detach().clone() + 1 for n, p in params.items()}
    digest = model_digest(rig.model)
    name = "model.layers.1.mlp.down_proj.weight"
    bad_shape = dict(good, **{name: good[name][:, :-1]})
    with pytest.raises(ValueError, match=f"{name}: staged shape"):
        rig.receiver.apply(bad_shape)
    bad_dtype = dict(good, **{name: good[name].double()})
    with pytest.raises(ValueError, match=f"{name}: staged dtype"):
        rig.receiver.apply(bad_dtype)
    partial = {n: t for n, t in good.items() if n != name}
    with pytest.raises(ValueError, match="partial apply"):
        rig.receiver.apply(partial)
    with pytest.raises(ValueError, match="no parameter"):
        check_staged(params, dict(good, extra=good[name]))
    assert model_digest(rig.model) == digest


def test_publisher_rejects_bad_shards_and_holds_live_versions(rig_factory):
    rig = rig_factory()
    pub = rig.publishers[0]
    shards = megatron_shards_from_hf(rig.version_state(1), rig.model_config, tp_size=1, tp_rank=0)
    (d, t), rest = shards[0], shards[1:]
    with pytest.raises(ValueError, match=f"{d.name}: shard shape"):
        pub.publish(1, [(d, t[:-1]), *rest])
    with pytest.raises(ValueError, match=f"{d.name}: shard dtype"):
        pub.publish(1, [(d, t.double()), *rest])
    cuda_pub = RefitPublisher(
        pub.transport, rig.registry, PublisherConfig(MODEL_ID), backend=CudaBackend()
    )
    with pytest.raises(ValueError, match="not a cuda tensor"):
        cuda_pub.publish(1, shards)
    assert rig.registry.discover(MODEL_ID) == []  # nothing half-published
    pub.publish(1, shards)
    with pytest.raises(ValueError, match="already published"):
        pub.publish(1, shards)
    pub.publish(2, shards)
    with pytest.raises(RuntimeError, match="retire one first"):
        pub.publish(3, shards)
    pub.retire(1)
    pub.publish(3, shards)
    assert pub.live_versions() == [2, 3] and pub.stats.registrations == 2


def test_poller_applies_only_while_the_engine_is_paused(rig_factory):
    rig = rig_factory()
    gate = EngineGate()
    unsafe = []

    class GuardedReceiver(RefitReceiver):
        def apply(self, tensors):
            unsafe.append(not gate.paused)
            super().apply(tensors)

    rx = GuardedReceiver(
        rig.model,
        transport=rig.receiver.transport,
        registry=rig.registry,
        config=rig.receiver.config,
        target=rig.receiver.target,
        model_config=rig.model_config,
        backend=rig.backend,
    )
    stop, forwards = threading.Event(), []
    prompt = fixed_prompt(rig.model.config.vocab_size)

    def engine():
        while not stop.is_set():
            with gate.inference():
                rig.model(prompt)
                forwards.append(1)

    worker = threading.Thread(target=engine)
    worker.start()
    poller = RefitPoller(rx, gate.pause, gate.resume)
    poller.config.interval_s = 0.01
    try:
        poller.start()
        for version in (1, 2, 3):
            rig.publish(version)
            deadline = time.monotonic() + 20
            while rx.applied_version < version and time.monotonic() < deadline:
                time.sleep(0.01)
        assert rx.applied_version == 3
    finally:
        poller.stop()
        stop.set()
        worker.join(10)
        rx.buffers.close()
    assert unsafe and not any(unsafe) and not poller.errors and len(forwards) > 3
    # without real pause hooks the same guard trips: the check is not vacuous
    rig.publish(4)
    RefitPoller(rx, lambda timeout_s: None, lambda: None).poll_once()
    assert unsafe[-1] is True


def test_replica_fanout_prefers_trainers_unless_asked(rig_factory):
    rig = rig_factory()
    root = rig.receiver
    source = ReplicaSource(
        root, root.directory, make_transport("sim", "replica-agent"), backend=rig.backend
    )
    follower = rig.new_receiver(version_model("llama", None, 0), prefer_replicas=True)
    plain = rig.new_receiver(version_model("llama", None, 0))
    followers = [follower, plain]
    try:
        for version in (1, 2):
            rig.cycle(version)
            source.republish()
            assert follower.refit(version).source_kind == "replica"
            assert plain.refit(version).source_kind == "trainer"
            assert model_digest(follower.model) == model_digest(root.model)
        other = ReplicaSource(root, root.directory, source.publisher.transport, backend=rig.backend)
        assert other.source_id != source.source_id  # a restart never reuses an id
        rig.registry.retire(MODEL_ID, 2)  # the trainers retire v2: so do its replicas
        assert root.directory.sources(2, prefer_replicas=True) == []
    finally:
        source.close()
        source.publisher.transport.close()
        for rx in followers:
            rx.close()
            rx.transport.close()


@pytest.mark.skipif(
    not __import__("mx_reference.transport.nixl", fromlist=["nixl_available"]).nixl_available(),
    reason="nixl wheel not installed",
)
def test_cycles_over_real_nixl(rig_factory):
    rig = rig_factory(transport="nixl", trainer_tp=2)
    first, second = rig.cycle(1), rig.cycle(2)
    assert second.registrations == 0 and first.bytes_pulled == second.bytes_pulled > 0
    state = rig.version_state(2)
    assert all(torch.equal(p, state[n]) for n, p in rig.receiver.params.items())


def test_benchmark_quick_writes_results_and_plot(tmp_path):
    from mx_sim.bench.refit import run

    results = run(tmp_path, quick=True)
    warm = next(r for r in results if "warm" in r.name)
    assert warm.met and warm.metrics["warm_registrations"] == 0
    assert warm.metrics["cold_registrations"] > 0
    assert (tmp_path / "refit.json").exists() and (tmp_path / "refit_phases.png").exists()


@pytest.mark.reliability
@pytest.mark.parametrize("rows", [2**34, 2**28, 65])
def test_a_manifest_declaring_a_shape_the_model_does_not_have_allocates_nothing(rig_factory, rows):
    # a hostile or mismatched manifest: the final norm claims `rows` elements (the model has 64).
    # 2**34 float32 elements once made a receiver try to allocate 68.7 GB before failing
    rig = rig_factory()
    rig.cycle(1)
    (manifest,) = rig.publish(2)
    rig.registry.retire(MODEL_ID, 2)
    name = "decoder.final_layernorm.weight"
    forged = [
        msgspec.structs.replace(d, global_shape=(rows,), nbytes=rows * 4) if d.name == name else d
        for d in manifest.tensors
    ]
    rig.registry.publish(make_manifest(MODEL_ID, 3, forged, agent_metadata=manifest.agent_metadata))
    arenas = dict(rig.receiver.buffers._arenas)
    digest = model_digest(rig.model)
    with pytest.raises(RefitError, match=f"{name}.*field 'global_shape'.*\\({rows},\\).*\\(64,\\)"):
        rig.receiver.refit(3)
    assert rig.receiver.buffers._arenas == arenas  # nothing allocated or registered
    assert model_digest(rig.model) == digest


@pytest.mark.reliability
def test_a_failed_cold_cycle_releases_the_arenas_it_allocated(rig_factory):
    rig = rig_factory(trainer_tp=2, fault=Fault("read_failed", cycle=1, rank=1))
    with pytest.raises(RefitError, match="injected failure"):
        rig.cycle(1)
    assert rig.receiver.buffers.keys() == set()  # nothing stays allocated or registered
    assert rig.receiver.transport.registered() == []
    rig.cycle(2)  # the next version sets them up again
    assert rig.receiver.applied_version == 2 and rig.receiver.buffers.keys()
