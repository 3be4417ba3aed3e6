"""Signing later: a publisher publishes its manifest before hashing, receivers pull meanwhile and
read the digests from the registry before they verify. What they verify against is what a
publisher signing at once puts in its manifest; a corrupt shard or digests that never come fail
the cycle with the model untouched."""

from __future__ import annotations

import msgspec
import pytest
import torch

from mx_reference.refit.apply import model_digest
from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.publisher import RefitPublisher
from mx_reference.refit.receiver import RefitError
from mx_reference.refit.shards import ShardedRefitReceiver
from mx_reference.refit.wire import (
    Signatures,
    revision_of,
    shard_checksum,
    shard_digest,
    sign,
    validate_manifest,
)
from mx_sim.conformance.sharded_adapter import cut, vllm_shard
from mx_sim.fixtures import TinyModelSpec, version_model
from mx_sim.refit.faults import Fault
from mx_sim.refit.rig import RefitRig, Replica, RigConfig


def _params(rig: RefitRig) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in rig.receiver.params.items()}


@pytest.mark.parametrize("transport", ["sim", "nixl"])
def test_signed_later_versions_apply_bit_exact_against_the_digests_of_signing_at_once(transport):
    with RefitRig(RigConfig(transport=transport, trainer_tp=2, sign_later=True)) as rig:
        before = _params(rig)
        for v in (1, 2, 3):
            manifests = rig.publish(v)
            assert all(m.signed_later for m in manifests)
            assert not any(d.digest or d.checksum is not None for m in manifests for d in m.tensors)
            rig.receiver.refit(v)
            state = rig.version_state(v)
            for name, p in rig.receiver.params.items():
                assert torch.equal(p, state[name]), (v, name)
                assert not torch.equal(before[name], state[name]), (v, name)  # A != B
            before = _params(rig)
            for trainer, m in zip(rig.trainers, manifests, strict=True):
                trainer.publisher.wait_signed()
                signed = rig.registry.signed(m)
                shards = trainer.source.shards(v)
                want = [(shard_digest(t), shard_checksum(d, t)) for d, t in shards]
                assert [(d.digest, d.checksum) for d in signed.tensors] == want
                assert signed.revision == revision_of([digest for digest, _ in want])


def test_signing_on_a_tcp_store_is_not_held_up_by_a_wait_on_the_same_client():
    # the publisher's registry is the receiver's: one TCPStore client, which runs one call at
    # a time; the receiver blocks waiting for the digests that the signing thread publishes
    with RefitRig(RigConfig(tcp_store=True, sign_later=True, timeout_s=5.0)) as rig:
        before = _params(rig)
        rig.cycle(1)
        state = rig.version_state(1)
        for name, p in rig.receiver.params.items():
            assert torch.equal(p, state[name]) and not torch.equal(p, before[name]), name


def test_a_corrupt_shard_signed_later_is_refused_naming_tensor_and_source_rank():
    fault = Fault("corrupt_shard", cycle=2, rank=1)
    with RefitRig(RigConfig(trainer_tp=2, sign_later=True, fault=fault)) as rig:
        rig.cycle(1)
        digest = model_digest(rig.model)
        with pytest.raises(RefitError, match=r"\S+: content digest mismatch against source rank 1"):
            rig.cycle(2)
        assert model_digest(rig.model) == digest and rig.receiver.applied_version == 1
        rig.cycle(3)
        state = rig.version_state(3)
        assert all(torch.equal(p, state[n]) for n, p in rig.receiver.params.items())


def test_digests_that_never_come_time_the_cycle_out_and_the_publisher_reports_why(monkeypatch):
    with RefitRig(RigConfig(sign_later=True, timeout_s=0.5)) as rig:
        rig.cycle(1)
        digest = model_digest(rig.model)

        def crash(self, manifest, shards):
            raise RuntimeError("the hashing thread crashed")

        monkeypatch.setattr(RefitPublisher, "_sign", crash)
        rig.publish(2)
        with pytest.raises(TimeoutError, match="v2: source rank 0 published no digests"):
            rig.receiver.refit(2)
        assert model_digest(rig.model) == digest and rig.receiver.applied_version == 1
        publisher = rig.publishers[0]
        with pytest.raises(RuntimeError, match="the hashing thread crashed"):
            publisher.close()  # reports the failure, and deregisters all the same
        assert publisher.live_versions() == [] and publisher.transport.registered() == []


def test_signatures_are_refused_for_another_manifest():
    with RefitRig(RigConfig(sign_later=True)) as rig:
        (m,) = rig.publish(1)
        rig.publishers[0].wait_signed()
        signed = rig.registry.signed(m)
        good = Signatures(
            names_digest=m.names_digest,
            digests=tuple(d.digest for d in signed.tensors),
            checksums=tuple(d.checksum for d in signed.tensors),
        )
        short = msgspec.structs.replace(good, digests=good.digests[:-1])
        with pytest.raises(ValueError, match="field 'signatures'"):
            sign(m, short)
        with pytest.raises(ValueError, match="field 'signatures'"):
            rig.registry.publish_signatures(m, msgspec.structs.replace(good, names_digest="x"))
        with pytest.raises(ValueError, match="field 'signed_later': False"):
            rig.registry.publish_signatures(signed, good)
        with pytest.raises(ValueError, match="field 'signed_later': its descriptors carry"):
            validate_manifest(msgspec.structs.replace(signed, signed_later=True))


@pytest.mark.timeout(60)
def test_sharded_ranks_verify_checksums_signed_later_and_refuse_a_corrupt_read():
    spec, tp = TinyModelSpec(num_kv_heads=4), 4
    fault = Fault("corrupt_shard", cycle=tp + 1, rank=0)  # reads: one per rank and version
    config = RigConfig("llama", spec, trainer_tp=2, sign_later=True, fault=fault)
    with RefitRig(config) as rig, Replica(tp) as replica:
        engines = [vllm_shard(version_model("llama", spec, 0), tp, r) for r in range(tp)]
        receivers = replica.map(
            lambda r: rig.new_receiver(
                engines[r].model,
                make=ShardedRefitReceiver,
                target=TargetLayout(tp_size=tp, tp_rank=r),
                group=replica.groups[r],
                layout=engines[r].layout,
                local=engines[r].local,
                meta=engines[r].meta,
                backend=rig.backend,
            )
        )

        def holds(version: int) -> list[dict[str, torch.Tensor]]:
            want = rig.weights.params(version)
            return [{n: cut(want, p) for n, p in e.layout.items()} for e in engines]

        rig.publish(1)
        replica.map(lambda r: receivers[r].refit(1))
        for engine, want in zip(engines, holds(1), strict=True):
            assert all(torch.equal(engine.local[n], want[n]) for n in want)
        rig.publish(2)
        errors = replica.map(lambda r: _error(lambda: receivers[r].refit(2)))
        assert all("content checksum mismatch" in e for e in errors), errors
        for engine, want in zip(engines, holds(1), strict=True):  # v1 kept, on every rank
            assert all(torch.equal(engine.local[n], want[n]) for n in want)


def _error(fn) -> str:
    try:
        fn()
    except RefitError as exc:
        return str(exc)
    return "no error"
