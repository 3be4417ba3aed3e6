"""Publishing in place: the trainer's own storage is registered once and read where it lies; the
hold (receivers release, ``begin_write`` waits) and the write counter that fails a receiver
closed when the trainer writes before it is done."""

from __future__ import annotations

import pytest
import torch

from mx_reference.refit.apply import model_digest
from mx_reference.refit.layouts import megatron_shards_from_hf
from mx_reference.refit.receiver import RefitError
from mx_sim.refit.ranks import MODEL_ID, packed_shards
from mx_sim.refit.rig import RefitRig, RigConfig


def step(rig: RefitRig, views, version: int) -> None:
    """The trainer's optimizer step: version ``version``'s values written into its storage."""
    new = megatron_shards_from_hf(
        rig.version_state(version), rig.model_config, tp_size=1, tp_rank=0
    )
    for (_, view), (_, t) in zip(views, new, strict=True):
        view.copy_(t)


@pytest.fixture(params=[("sim", False), ("nixl", False), ("sim", True)], ids=str)
def rig(request):
    transport, sign_later = request.param  # signed later: begin_write waits for the digests too
    with RefitRig(RigConfig(transport=transport, timeout_s=5.0, sign_later=sign_later)) as rig:
        yield rig


def test_in_place_versions_apply_bit_exact_with_one_registration_and_no_copy(rig):
    publisher = rig.publishers[0]
    shards = megatron_shards_from_hf(rig.version_state(1), rig.model_config, tp_size=1, tp_rank=0)
    views = packed_shards(shards)
    nbytes = views[0][1].untyped_storage().nbytes()
    before = {n: p.detach().clone() for n, p in rig.receiver.params.items()}
    for v in (1, 2, 3):
        if v > 1:
            publisher.begin_write(readers=1, timeout_s=5.0)  # the receiver released v - 1
            step(rig, views, v)
        manifest = publisher.publish(v, views, in_place=True)
        assert all(0 <= d.offset < nbytes for d in manifest.tensors)
        timing = rig.receiver.refit(v)
        state = rig.version_state(v)
        for name, p in rig.receiver.params.items():
            assert torch.equal(p, state[name]), (v, name)
            assert not torch.equal(before[name], state[name]), (v, name)  # A != B
        before = {n: p.detach().clone() for n, p in rig.receiver.params.items()}
        if v > 1:
            assert (timing.registrations, timing.bytes_allocated) == (0, 0)
    # the storage was registered once; nothing was copied into an arena
    assert publisher.stats.registrations == 1 and publisher.stats.bytes_registered == nbytes


def test_a_trainer_writing_before_the_receiver_is_done_fails_the_cycle_closed(rig):
    publisher = rig.publishers[0]
    shards = megatron_shards_from_hf(rig.version_state(1), rig.model_config, tp_size=1, tp_rank=0)
    views = packed_shards(shards)
    publisher.publish(1, views, in_place=True)
    rig.receiver.refit(1)
    publisher.begin_write(readers=1)
    step(rig, views, 2)
    publisher.publish(2, views, in_place=True)
    # the trainer steps on (no hold: readers=0) while v2 has not been read yet
    publisher.begin_write()
    step(rig, views, 3)
    digest = model_digest(rig.model)
    with pytest.raises(RefitError, match=r"source rank 0: write counter 1 -> 2 during the pull"):
        rig.receiver.refit(2)
    assert model_digest(rig.model) == digest
    publisher.publish(3, views, in_place=True)  # the next version applies
    rig.receiver.refit(3)
    state = rig.version_state(3)
    assert all(torch.equal(p, state[n]) for n, p in rig.receiver.params.items())


def test_in_place_publishing_refuses_what_it_cannot_read_where_it_lies(rig):
    publisher = rig.publishers[0]
    shards = megatron_shards_from_hf(rig.version_state(1), rig.model_config, tp_size=1, tp_rank=0)
    views = packed_shards(shards)
    with pytest.raises(ValueError, match=rf"{views[1][0].name}: field 'in_place'"):
        publisher.publish(
            1, [views[0], (views[1][0], views[1][1].clone()), *views[2:]], in_place=True
        )
    assert publisher.stats.registrations == 0
    publisher.publish(1, views, in_place=True)
    with pytest.raises(ValueError, match="v1 is still live in the trainer's storage"):
        publisher.publish(2, views, in_place=True)
    with pytest.raises(TimeoutError, match="0 of 1 receivers released it"):
        publisher.begin_write(readers=1, timeout_s=0.1)
    assert publisher.live_versions() == [1]
    rig.receiver.refit(1)
    publisher.begin_write(readers=1)
    assert publisher.live_versions() == [] and rig.registry.discover(MODEL_ID) == [1]
