"""The receiver does not wait for a version to be complete: it takes each trainer rank's newest
manifest and treats the set as the version it asked for, and, like an engine that checks only
that every name arrived, never compares the replicated copies two ranks publish. So while one
rank is still publishing it applies a model mixing two versions (issue 16: a version that only
some trainer ranks published, applied as a mixed-version model; the reference waits for the
registry's commit, and its digests would also catch the mix)."""

from __future__ import annotations

import msgspec

from mx_reference.refit.apply import check_staged
from mx_reference.refit.receiver import RefitReceiver
from mx_reference.refit.wire import decode_manifest
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class NewestPerRankReceiver(RefitReceiver):
    def _wait_for(self, wanted):
        return wanted  # the bug (1/2): a version is ready once any rank published it

    def _sources(self, version):
        store = self.registry._ns(self.config.model_id)
        world = int(store.get(f"v{version}/world"))
        sources = []
        for rank in range(world):
            newest = next(v for v in range(version, 0, -1) if store.check([f"v{v}/rank/{rank}"]))
            manifest = decode_manifest(store.get(f"v{newest}/rank/{rank}"))
            # the bug (2/2): whatever a rank has is taken as the version asked for
            sources.append(msgspec.structs.replace(manifest, version=version))
        return sources

    def verify(self, manifests, canonical, tensors):
        check_staged(self.params, tensors)  # names, shapes and dtypes only


class NewestPerRankAdapter(ReferenceAdapter):
    receiver_class = NewestPerRankReceiver


def factory() -> NewestPerRankAdapter:
    return NewestPerRankAdapter(CpuMockBackend())
