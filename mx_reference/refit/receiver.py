"""Inference side of refit: one cycle takes a new weight version into a live model.

A cycle (:meth:`RefitReceiver.refit`, or :meth:`~RefitReceiver.stage` then
:meth:`~RefitReceiver.commit`) reads top-down in :meth:`RefitReceiver.stage`:

1. **discover** the version's source manifests (trainers first, replicas first on request);
2. **plan** this rank's slices (``PlanCache``: a warm cycle with an unchanged layout rebuilds
   nothing);
3. **allocate** destination and scratch arenas, cached by the plan's layout, so a warm cycle
   allocates and registers nothing;
4. **pull**: one READ per source with every descriptor pair (coalesced); strided pieces
   (row-parallel, axis 1) read the whole source shard into scratch; then, from a source that
   publishes in place, its write counter: moved since the manifest, the cycle fails closed;
5. **assemble**: copy scratch pieces into place;
6. **gather + merge + translate**: all-gather the replica's slices, merge each tensor's shards
   into its canonical Megatron form and translate to HF names and layouts, as views
   (:class:`~mx_reference.refit.layouts.Regrouped` where the HF shape is none, like q, k, v);
7. **verify**: the names assembled are exactly the names published, and every source shard
   re-cut from the assembled tensors has the digest its publisher announced;
8. **apply** atomically and in place (:mod:`~mx_reference.refit.apply`), copying those views
   straight into the parameters, then the post-load hook, exactly once.

The public steps (:meth:`~RefitReceiver.allocate`, :meth:`~RefitReceiver.pull`,
:meth:`~RefitReceiver.assemble`, :meth:`~RefitReceiver.merge`,
:meth:`~RefitReceiver.translate`, :meth:`~RefitReceiver.verify`, :meth:`~RefitReceiver.apply`)
are the seams an engine (or a conformance mutant) overrides; everything else is private.

Why gather Megatron-layout slices rather than HF shards: the publishers' digests are over their
Megatron shards, so only the source layout lets a replica verify every byte it received; and
one code path serves 1 or N ranks (with one rank the gather is the identity).

Every failure before apply leaves the model untouched; the replica votes after the pull, so one
rank's failure becomes a clear error on every rank instead of a hang in the gather.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mx_reference.backends import AcceleratorBackend, resolve_backend
from mx_reference.refit.apply import apply_in_place, check_staged, model_parameters
from mx_reference.refit.gather import all_gather_shards, vote
from mx_reference.refit.layouts import (
    RefitModelConfig,
    Staged,
    StagedTensors,
    canonical_from_ranks,
    canonical_from_shards,
    canonical_shapes,
    hf_from_canonical,
    hf_meta,
    megatron_name_map,
    shard_pieces,
)
from mx_reference.refit.planner import (
    Piece,
    PlanCache,
    RefitPlan,
    TargetLayout,
    TensorPlan,
    piece_spans,
)
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.wire import (
    ShardDescriptor,
    SourceManifest,
    aligned,
    decode_endpoint,
    dtype_name,
    name_digest,
    shard_digest,
)
from mx_reference.transport.base import MemDesc, Registration, RemoteDesc, Transport, coalesce

if TYPE_CHECKING:
    from mx_reference.refit.replicas import ReplicaDirectory


class RefitError(RuntimeError):
    """A cycle failed; the model still holds its previous version."""


class StaleVersion(RefitError):
    """The newest committed version is not newer than the one applied."""


@dataclass
class CycleTiming:
    """One cycle: seconds per phase plus what setup cost (the per-phase table of Dynamo PR #10901)."""

    version: int = 0
    discover: float = 0.0
    plan: float = 0.0
    alloc: float = 0.0
    register: float = 0.0
    pull: float = 0.0
    translate: float = 0.0
    verify: float = 0.0
    apply: float = 0.0
    total: float = 0.0
    registrations: int = 0
    bytes_allocated: int = 0
    bytes_pulled: int = 0
    plan_cache_hit: bool = False
    source_kind: str = "trainer"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _phase(timing: CycleTiming, name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timing.<name>``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        setattr(timing, name, getattr(timing, name) + time.perf_counter() - start)


@dataclass
class StagedVersion:
    """A verified version ready to apply: HF tensors by parameter name."""

    version: int
    tensors: StagedTensors
    canonical: dict[str, torch.Tensor]
    timing: CycleTiming


@dataclass
class ReceiverConfig:
    model_id: str
    timeout_s: float = 30.0
    prefer_replicas: bool = False
    expert_layout: str = "per_expert"


@dataclass(eq=False)
class Arena:
    """One registered byte buffer holding many tensors at fixed offsets."""

    buffer: torch.Tensor  # (nbytes,) uint8
    registration: Registration
    views: dict[Any, torch.Tensor] = field(default_factory=dict)


@dataclass
class Buffers:
    """A cycle's arenas: ``dest`` holds this rank's tensors (by name), ``scratch`` the whole
    source shards strided pieces are cut from (by ``(source rank, name)``)."""

    dest: Arena | None
    scratch: Arena | None
    counters: Arena | None = None  # by source rank: the write counters of in-place sources


class BufferCache:
    """Registered arenas keyed by layout, least recently used evicted first; a layout seen
    before costs nothing. The cache owns no contents: every tensor handed out is fully
    rewritten in the cycle that uses it."""

    def __init__(self, transport: Transport, backend: AcceleratorBackend, max_entries: int = 4):
        self.transport, self.backend, self.max_entries = transport, backend, max_entries
        self._arenas: OrderedDict[tuple, Arena] = OrderedDict()

    def get(
        self,
        key: tuple,
        layout: Sequence[tuple[Any, tuple[int, ...], torch.dtype]],
        timing: CycleTiming,
    ) -> Arena:
        """The arena for ``layout``; allocation and registration land in ``timing``."""
        arena = self._arenas.get(key)
        if arena is not None:
            self._arenas.move_to_end(key)
            return arena
        sizes = [torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in layout]
        with _phase(timing, "alloc"):
            total = sum(aligned(n) for n in sizes)
            buffer = torch.zeros(total, dtype=torch.uint8, device=self.backend.torch_device())
        with _phase(timing, "register"):
            registration = self.transport.register([buffer])
        timing.registrations += 1
        timing.bytes_allocated += total
        arena, at = Arena(buffer, registration), 0
        for (name, shape, dtype), nbytes in zip(layout, sizes, strict=True):
            arena.views[name] = buffer[at : at + nbytes].view(dtype).view(shape)
            at += aligned(nbytes)
        if len(self._arenas) >= self.max_entries:
            _, old = self._arenas.popitem(last=False)
            self.transport.deregister(old.registration)
        self._arenas[key] = arena
        return arena

    def keys(self) -> set[tuple]:
        return set(self._arenas)

    def release(self, keys: set[tuple]) -> None:
        """Deregister and drop the arenas of ``keys``."""
        for key in keys:
            self.transport.deregister(self._arenas.pop(key).registration)

    def close(self) -> None:
        self.release(self.keys())


class RefitReceiver:
    """Takes weight versions into ``model`` (a real HF model) in place.

    ``target`` is this rank's own TP position (never derived from its global rank). ``group``
    is the inference replica's process group (``None`` for one rank); its members all-gather
    their slices, ordered by ``target.tp_rank``. ``owns(name)`` narrows which Megatron tensors
    this rank pulls (an inference PP stage); by default all. ``directory`` lists replica
    sources besides the trainers (:class:`~mx_reference.refit.replicas.ReplicaDirectory`).
    ``post_load(model)`` runs once per apply (FP8 re-quantization, fused-layout rebuilds) and
    must tolerate running every cycle. ``meta`` is the model's full HF parameters as meta
    tensors, for a model that does not carry them itself (a sharded engine,
    :class:`~mx_reference.refit.shards.ShardedRefitReceiver`); by default read off ``model``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        transport: Transport,
        registry: VersionRegistry,
        config: ReceiverConfig,
        target: TargetLayout,
        model_config: RefitModelConfig,
        backend: AcceleratorBackend | None = None,
        group: dist.ProcessGroup | None = None,
        directory: ReplicaDirectory | None = None,
        owns: Callable[[str], bool] | None = None,
        post_load: Callable[[torch.nn.Module], None] | None = None,
        meta: Mapping[str, torch.Tensor] | None = None,
    ):
        self.model, self.transport, self.registry = model, transport, registry
        self.config, self.target, self.model_config = config, target, model_config
        self.backend = resolve_backend(backend)
        self.group, self.directory, self.post_load = group, directory, post_load
        self.owns = owns or (lambda name: True)
        self.params: Mapping[str, torch.Tensor] = model_parameters(model)
        meta = hf_meta(model) if meta is None else meta
        self._aliases = set(meta)
        names = megatron_name_map(model_config, config.expert_layout)
        # every Megatron tensor takes the dtype of the HF parameters it is made of
        expected = {m: dtype_name(meta[hf[0]].dtype) for m, hf in names.items() if hf[0] in meta}
        self.plans = PlanCache(expected=expected)
        self.global_shapes = canonical_shapes(meta, model_config, config.expert_layout)
        self.buffers = BufferCache(transport, self.backend)
        self.applied_version = 0
        self.history: list[CycleTiming] = []
        self._remotes: dict[str, tuple[bytes, str]] = {}  # source id -> (metadata, agent)

    # -- the cycle -------------------------------------------------------------------------

    def latest_version(self) -> int | None:
        found = self.registry.discover(self.config.model_id, self.applied_version + 1)
        return found[0] if found else None

    def refit(self, min_version: int | None = None) -> CycleTiming:
        """Wait for a version ``>= min_version`` (default: newer than applied), stage, apply."""
        wanted = self.applied_version + 1 if min_version is None else min_version
        start = time.perf_counter()
        version = self._wait_for(wanted)
        waited = time.perf_counter() - start
        staged = self.stage(version)
        staged.timing.discover += waited
        staged.timing.total += waited
        return self.commit(staged)

    def stage(self, version: int) -> StagedVersion:
        """Everything but apply: the model is not touched, so this may overlap inference."""
        if version <= self.applied_version:
            raise StaleVersion(
                f"version {version} is not newer than the applied version {self.applied_version}"
            )
        timing = CycleTiming(version=version)
        start = time.perf_counter()
        with self._arenas_released_on_failure():
            failure: Exception | None = None
            manifests: Sequence[SourceManifest] = ()
            try:
                with _phase(timing, "discover"):
                    manifests = self._sources(version)
                timing.source_kind = manifests[0].source_kind
                with _phase(timing, "plan"):
                    plan = self._plan(manifests, timing)
                buffers = self.allocate(plan, manifests, timing)
                with _phase(timing, "pull"):
                    timing.bytes_pulled = self.pull(plan, manifests, buffers)
                with _phase(timing, "translate"):
                    local = self.assemble(plan, buffers)
            except Exception as exc:  # reported to the replica through the vote, then re-raised
                failure = exc
            self._release(version, manifests)  # reading is over, pulled or not
            self._vote(version, failure)
            with _phase(timing, "translate"):
                canonical = self._gather(plan, local)
                tensors = StagedTensors(self.translate(canonical))
            with _phase(timing, "verify"):
                self.verify(manifests, canonical, tensors)
            timing.total = time.perf_counter() - start
        return StagedVersion(version, tensors, canonical, timing)

    def commit(self, staged: StagedVersion) -> CycleTiming:
        """Apply a staged version in place (the engine must not be running a forward)."""
        if staged.version <= self.applied_version:
            raise StaleVersion(
                f"staged v{staged.version} is not newer than applied v{self.applied_version}"
            )
        with _phase(staged.timing, "apply"):
            self.apply(staged.tensors)
            self.backend.synchronize()
            if self.post_load is not None:
                self.post_load(self.model)
        self.applied_version = staged.version
        staged.timing.total += staged.timing.apply
        self.history.append(staged.timing)
        return staged.timing

    def close(self) -> None:
        self.buffers.close()

    # -- the seams -------------------------------------------------------------------------

    def allocate(
        self, plan: RefitPlan, manifests: Sequence[SourceManifest], timing: CycleTiming
    ) -> Buffers:
        """Destination arena (this rank's tensors at their plan shapes) and scratch arena
        (whole source shards that strided pieces are cut from), both cached by layout."""
        owned = [t for name, t in plan.tensors.items() if self.owns(name)]
        dest = [(t.name, t.dst_shape, t.dtype) for t in owned]
        by_rank = {m.rank: {d.name: d for d in m.tensors} for m in manifests}
        scratch = sorted(
            {
                ((p.src_rank, t.name), by_rank[p.src_rank][t.name].local_shape, t.dtype)
                for t in owned
                for p in t.pieces
                if self._via_scratch(p, t)
            },
            key=lambda e: e[0],
        )
        in_place = [
            (m.rank, (1,), torch.int64)
            for m in manifests
            if decode_endpoint(m.agent_metadata).counter_addr
        ]
        return Buffers(
            self.buffers.get(("dest", tuple(dest)), dest, timing) if dest else None,
            self.buffers.get(("scratch", tuple(scratch)), scratch, timing) if scratch else None,
            self.buffers.get(("counters", tuple(in_place)), in_place, timing) if in_place else None,
        )

    def pull(self, plan: RefitPlan, manifests: Sequence[SourceManifest], buffers: Buffers) -> int:
        """One READ per source: direct pieces land in their destination views; a strided
        piece either reads its whole source shard into scratch once (``_via_scratch``), or
        its contiguous spans straight into the destination (one per row of a row-parallel
        piece: exactly its bytes, at a descriptor each). Returns the bytes pulled."""
        pairs: dict[int, list[tuple[MemDesc, RemoteDesc]]] = {}
        whole: set[tuple[int, str]] = set()
        sources = {m.rank: _Source(m, self._agent(m)) for m in manifests}
        for name, t in plan.tensors.items():
            if not self.owns(name):
                continue
            assert buffers.dest is not None
            dview = buffers.dest.views[name]
            for p in t.pieces:
                src = sources[p.src_rank]
                if not self._via_scratch(p, t):
                    shape, size = src.shards[name].local_shape, t.spec.element_size
                    for s_off, d_off, n in piece_spans(p, shape, t.dst_shape, size):
                        pairs.setdefault(p.src_rank, []).append(
                            (MemDesc(dview.data_ptr() + d_off, n), src.remote(name, s_off, n))
                        )
                elif (p.src_rank, name) not in whole:
                    assert buffers.scratch is not None
                    whole.add((p.src_rank, name))
                    nbytes = src.shards[name].nbytes
                    local = MemDesc(buffers.scratch.views[(p.src_rank, name)].data_ptr(), nbytes)
                    pairs.setdefault(p.src_rank, []).append((local, src.remote(name, 0, nbytes)))
        nbytes = self._read(pairs)
        if buffers.counters is not None:
            self._check_write_counters(sources, buffers.counters)
        return nbytes

    def assemble(self, plan: RefitPlan, buffers: Buffers) -> dict[str, torch.Tensor]:
        """Copy strided pieces out of scratch; return this rank's destination tensors."""
        out = {}
        for name, t in plan.tensors.items():
            if not self.owns(name):
                continue
            assert buffers.dest is not None
            dview = buffers.dest.views[name]
            for p in t.pieces:
                if self._via_scratch(p, t):
                    assert buffers.scratch is not None
                    p.dst_view(dview).copy_(p.src_view(buffers.scratch.views[(p.src_rank, name)]))
            out[name] = dview
        return out

    def merge(self, spec: ShardDescriptor, shards: list[torch.Tensor]) -> torch.Tensor:
        """One tensor's shards from every replica rank (TP order) -> its canonical form."""
        return canonical_from_shards(
            spec, shards, vocab_divisible_by=self.target.vocab_divisible_by
        )

    def translate(self, canonical: Mapping[str, torch.Tensor]) -> dict[str, Staged]:
        """Canonical Megatron -> HF tensors for this model's parameters, on its device; views
        of ``canonical`` wherever possible (apply makes the copies)."""
        hf = hf_from_canonical(canonical, self.model_config, self.config.expert_layout)
        out: dict[str, Staged] = {}
        for name, t in hf.entries.items():
            if name in self.params:
                out[name] = t.to(self.params[name].device)
            elif name not in self._aliases:
                raise RefitError(f"{name}: translated tensor has no parameter in the model")
        return out

    def verify(
        self,
        manifests: Sequence[SourceManifest],
        canonical: Mapping[str, torch.Tensor],
        tensors: Mapping[str, torch.Tensor],
    ) -> None:
        """Names assembled == names published, and every published shard digest matches.
        Digests signed later are waited for once this rank has hashed its own bytes: the
        publisher and the receiver hash at the same time."""
        published = sorted({d.name for m in manifests for d in m.tensors})
        if name_digest(sorted(canonical)) != name_digest(published):
            extra = sorted(set(canonical) ^ set(published))
            raise RefitError(f"name sequence digest mismatch: {extra[:5]} differ")

        def digest(m: SourceManifest, i: int) -> str:
            d = m.tensors[i]
            full = canonical[d.name]
            if d.grouped:
                full = full[d.expert_ids[0] : d.expert_ids[-1] + 1]
            pieces = shard_pieces(
                d, full, m.tp_size, m.tp_rank, vocab_divisible_by=self.target.vocab_divisible_by
            )
            return shard_digest(*pieces, axis=d.shard_axis)

        hashed = [
            (j, i)
            for j, m in enumerate(manifests)
            for i, d in enumerate(m.tensors)
            if d.digest or m.signed_later
        ]
        # xxhash drops the GIL while hashing, so threads hashing shards use every core
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            found = list(pool.map(lambda ji: digest(manifests[ji[0]], ji[1]), hashed))
        signed = [self.registry.signed(m) for m in manifests]
        for (j, i), got in zip(hashed, found, strict=True):
            m, d = signed[j], signed[j].tensors[i]
            if got != d.digest:
                raise RefitError(
                    f"{d.name}: content digest mismatch against source rank {m.rank} "
                    f"(v{m.version}): corrupted or stale bytes"
                )
        check_staged(self.params, tensors)

    def apply(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """All-or-nothing in-place copy; parameter storage never moves."""
        apply_in_place(self.params, tensors)

    # -- private steps ---------------------------------------------------------------------

    def _read(self, pairs: Mapping[int, list[tuple[MemDesc, RemoteDesc]]]) -> int:
        """One READ per source rank of ``pairs``, all posted, then all waited for; the bytes."""
        handles = []
        try:
            for rank in sorted(pairs):
                handles.append(self.transport.make_read(coalesce(pairs[rank])))
            for h in handles:
                self.transport.post(h)
            for h in handles:
                self.transport.wait(h, self.config.timeout_s)
            return sum(h.nbytes for h in handles)
        finally:
            for h in handles:
                self.transport.release(h, cancel=True)

    def _release(self, version: int, manifests: Sequence[SourceManifest]) -> None:
        """Tell publishers that publish in place this rank is done reading ``version``: their
        :meth:`~mx_reference.refit.publisher.RefitPublisher.begin_write` waits for it."""
        if any(decode_endpoint(m.agent_metadata).counter_addr for m in manifests):
            self.registry.release(self.config.model_id, version)

    def _check_write_counters(self, sources: Mapping[int, _Source], counters: Arena) -> None:
        """Read the write counter of every in-place source after the pull: one that moved
        since its manifest means the trainer began writing before this receiver was done, and
        the bytes may be torn."""
        pairs = {}
        for rank, view in counters.views.items():
            e = sources[rank].endpoint
            remote = RemoteDesc(sources[rank].agent, e.counter_addr, 8, e.device_id)
            pairs[rank] = [(MemDesc(view.data_ptr(), 8), remote)]
        self._read(pairs)
        self.backend.synchronize()
        for rank, view in counters.views.items():
            published, now = sources[rank].endpoint.counter, int(view.item())
            if now != published:
                raise RefitError(
                    f"source rank {rank}: write counter {published} -> {now} during the pull: "
                    "the trainer wrote the memory it published in place before this receiver "
                    "released the version; refused, the model untouched"
                )

    def _via_scratch(self, p: Piece, t: TensorPlan) -> bool:
        """A strided piece is read whole into scratch here: few large reads (one per source
        shard) beat one descriptor per row. A sharded receiver pulls spans instead."""
        return not p.direct

    @contextlib.contextmanager
    def _arenas_released_on_failure(self) -> Iterator[None]:
        """A failed cycle releases the arenas it allocated: a broken or hostile version keeps
        no memory allocated and registered."""
        cached = self.buffers.keys()
        try:
            yield
        except BaseException:
            self.buffers.release(self.buffers.keys() - cached)
            raise

    def _wait_for(self, wanted: int) -> int:
        try:
            return self.registry.wait_for_version(
                self.config.model_id, wanted, timeout=self.config.timeout_s
            )
        except ValueError as exc:  # a registry entry that does not decode
            raise RefitError(f"v{wanted}: {exc}") from exc
        except TimeoutError as exc:
            older = self.registry.discover(self.config.model_id)
            if older:
                raise StaleVersion(
                    f"newest committed version {older[0]} is not >= {wanted} after "
                    f"{self.config.timeout_s:.3g} s (applied: {self.applied_version})"
                ) from exc
            raise

    def _sources(self, version: int) -> list[SourceManifest]:
        if self.directory is None:
            return self.registry.manifests(self.config.model_id, version)
        sets = self.directory.sources(version, prefer_replicas=self.config.prefer_replicas)
        if not sets:
            raise RefitError(f"v{version}: no source set found")
        return sets[0]

    def _plan(self, manifests: Sequence[SourceManifest], timing: CycleTiming) -> RefitPlan:
        hits = self.plans.hits
        plan = self.plans.get(manifests, self.target, self.model_config).require_complete()
        timing.plan_cache_hit = self.plans.hits > hits
        # before anything is allocated: a manifest may only describe this model's own tensors
        for name, t in plan.tensors.items():
            if t.spec.global_shape != self.global_shapes[name]:
                raise RefitError(
                    f"tensor {name!r}: field 'global_shape': sources declare "
                    f"{t.spec.global_shape}, this model's is {self.global_shapes[name]}"
                )
        return plan

    def _vote(self, version: int, failure: Exception | None) -> None:
        if vote(failure is None, self.group):
            return
        if failure is not None:
            raise RefitError(f"v{version}: {type(failure).__name__}: {failure}") from failure
        raise RefitError(f"v{version}: another rank of this replica failed; nothing applied")

    def _gather(
        self, plan: RefitPlan, local: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Every replica rank's slices -> canonical Megatron tensors."""
        if self.group is None and self.target.tp_size == 1:
            return dict(local)  # one rank at TP 1 holds every tensor whole: already canonical
        by_tp: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for tp_rank, tensors in all_gather_shards(self.target.tp_rank, local, self.group):
            by_tp.setdefault((tp_rank, 0), {}).update(tensors)
        specs = {name: t.spec for name, t in plan.tensors.items()}
        return canonical_from_ranks(by_tp, specs, tp_size=self.target.tp_size, merge=self.merge)

    def _agent(self, m: SourceManifest) -> str:
        """The transport agent of a source, loading (or refreshing) its metadata if new."""
        endpoint = decode_endpoint(m.agent_metadata)
        known = self._remotes.get(endpoint.source_id)
        if known is None or known[0] != endpoint.transport_metadata:
            agent = self.transport.add_remote(endpoint.transport_metadata)
            self._remotes[endpoint.source_id] = (endpoint.transport_metadata, agent)
        return self._remotes[endpoint.source_id][1]


class _Source:
    """One source rank of a cycle: its shards by name and where its arena lies."""

    def __init__(self, manifest: SourceManifest, agent: str):
        self.shards = {d.name: d for d in manifest.tensors}
        self.endpoint = decode_endpoint(manifest.agent_metadata)
        self.agent = agent

    def remote(self, name: str, offset: int, length: int) -> RemoteDesc:
        """``length`` bytes at ``offset`` inside shard ``name``, on the source's own device."""
        addr = self.endpoint.base_addr + self.shards[name].offset + offset
        return RemoteDesc(self.agent, addr, length, self.endpoint.device_id)
