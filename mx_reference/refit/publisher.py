"""Trainer side of refit: publish this rank's shards of each weight version.

A publisher copies its shards into one flat *arena* per live version, registers each arena once
with the transport (a registration is a kernel call: ``ibv_reg_mr`` cost ~150 ms per cycle in
Dynamo PR #10901 before caching), and publishes a :class:`SourceManifest` per version. Arenas are reused
across versions whose layout is unchanged, so steady-state publishing registers nothing. A
version's arena stays untouched until that version is retired: receivers may still be reading it.

A publisher may also publish *in place* (``publish(..., in_place=True)``): the shards are
contiguous views of one storage the trainer keeps (Megatron's contiguous parameter buffer),
registered once and read where they lie, with no copy and no second copy of the model's memory.
The trainer keeps them unwritten until the receivers are done: :meth:`RefitPublisher.begin_write`
waits for them (the registry's release count) and bumps a write counter registered beside the
storage; a receiver reads that counter after its pull, and one that moved fails its cycle
closed, the model untouched.

Receivers need more than the transport's opaque metadata to address shards: a manifest's
``agent_metadata`` carries a :class:`~mx_reference.refit.wire.Endpoint` (transport metadata,
the arena's base address and device, and a source id unique to this publisher incarnation, and
for in-place publishing the write counter's address and value), and each descriptor's
``offset`` is relative to that base.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from mx_reference.backends import AcceleratorBackend, resolve_backend
from mx_reference.refit.registry import VersionRegistry
from mx_reference.refit.wire import (
    DTYPES,
    Endpoint,
    ShardDescriptor,
    Signatures,
    SourceManifest,
    aligned,
    encode_endpoint,
    layout_signature,
    make_manifest,
    revision_of,
    shard_checksum,
    shard_digest,
)
from mx_reference.transport.base import Registration, Transport


@dataclass
class PublisherConfig:
    model_id: str
    source_kind: str = "trainer"  # or "replica"
    max_live_versions: int = 2  # arenas: one being read while the next is written
    # publish each manifest before hashing its shards: receivers pull while a background
    # thread computes the digests, then read them from the registry before they verify
    sign_later: bool = False


@dataclass(eq=False)
class _Arena:
    buffer: torch.Tensor  # (nbytes,) uint8, registered
    registration: Registration
    layout: str
    offsets: dict[str, int]
    version: int | None = None


@dataclass(eq=False)
class _Home:
    """The trainer's own storage, published in place: registered once, with its write
    counter (``(1,)`` int64) in the same registration."""

    base: int
    nbytes: int
    registration: Registration
    counter: torch.Tensor
    version: int | None = None


@dataclass
class PublisherStats:
    registrations: int = 0
    bytes_registered: int = 0
    versions_published: int = 0


def _signature(d: ShardDescriptor, shard: torch.Tensor) -> dict[str, Any]:
    """A descriptor's digest and position checksum of ``shard``, its bytes as published."""
    return {"digest": shard_digest(shard), "checksum": shard_checksum(d, shard)}


def arena_offsets(descs: Sequence[ShardDescriptor]) -> tuple[dict[str, int], int]:
    """Aligned byte offset of each shard in an arena, and the arena size."""
    offsets, end = {}, 0
    for d in descs:
        offsets[d.name] = end
        end += aligned(d.nbytes)
    return offsets, end


class RefitPublisher:
    """Publishes one trainer (or replica) rank's shards, version after version.

    ``tp``, ``pp`` and ``ep`` are ``(rank, size)`` within the publisher's parallel groups,
    never the global torch rank.
    """

    def __init__(
        self,
        transport: Transport,
        registry: VersionRegistry,
        config: PublisherConfig,
        *,
        backend: AcceleratorBackend | None = None,
        tp: tuple[int, int] = (0, 1),
        pp: tuple[int, int] = (0, 1),
        ep: tuple[int, int] = (0, 1),
        source_id: str | None = None,
    ):
        if config.max_live_versions < 1:
            raise ValueError("PublisherConfig.max_live_versions must be >= 1")
        self.transport, self.registry, self.config = transport, registry, config
        self.backend = resolve_backend(backend)
        self.tp, self.pp, self.ep = tp, pp, ep
        self.source_id = source_id or f"{config.source_kind}-{uuid.uuid4().hex[:12]}"
        self.stats = PublisherStats()
        self._arenas: list[_Arena] = []
        self._home: _Home | None = None
        self._signer = ThreadPoolExecutor(1, thread_name_prefix="mx-refit-sign")
        self._signer_registry = registry.connection() if config.sign_later else registry
        self._signing: Future[None] | None = None

    def live_versions(self) -> list[int]:
        return sorted(h.version for h in self._holders() if h.version is not None)

    def publish(
        self,
        version: int,
        shards: Sequence[tuple[ShardDescriptor, torch.Tensor]],
        *,
        in_place: bool = False,
    ) -> SourceManifest:
        """Publish version ``version`` of ``shards``.

        By default (a snapshot) the shards are copied into an arena registered once per
        layout, which stays as published until :meth:`retire`: the trainer may step on
        meanwhile. With ``in_place`` they are published where they lie: contiguous views of
        one storage, registered once (again only when the storage changes), nothing copied;
        call :meth:`begin_write` before writing them again."""
        self.wait_signed()
        if not shards:
            raise ValueError(f"publish v{version}: no shards")
        if version in self.live_versions():
            raise ValueError(f"publish v{version}: already published and not retired")
        for d, t in shards:
            self._check_shard(d, t)
        holder: _Arena | _Home
        if in_place:
            holder = home = self._home_of(shards)
            offsets = {d.name: t.data_ptr() - home.base for d, t in shards}
            regions, counter = home.registration.regions, home.counter
        else:
            holder = arena = self._arena_for([d for d, _ in shards])
            offsets, regions, counter = arena.offsets, arena.registration.regions, None
        holder.version = version  # claimed before the copy: a failure below retires it again
        sign_now = not self.config.sign_later
        try:
            finished, published = [], []  # descriptors; the bytes receivers read, as shards
            for d, t in shards:
                offset = offsets[d.name]
                if not in_place:
                    dest = arena.buffer[offset : offset + d.nbytes]
                    dest.copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
                    t = dest.view(DTYPES[d.dtype]).view(d.local_shape)
                signature = _signature(d, t) if sign_now else {}
                finished.append(msgspec.structs.replace(d, offset=offset, **signature))
                published.append(t)
            endpoint = Endpoint(
                transport_metadata=self.transport.metadata(),
                base_addr=regions[0].addr,
                device_id=regions[0].device_id,
                source_id=self.source_id,
                counter_addr=regions[1].addr if counter is not None else 0,
                counter=int(counter.item()) if counter is not None else 0,
            )
            manifest = make_manifest(
                self.config.model_id,
                version,
                finished,
                tp=self.tp,
                pp=self.pp,
                ep=self.ep,
                source_kind=self.config.source_kind,
                revision=revision_of([d.digest for d in finished]) if sign_now else "",
                agent_metadata=encode_endpoint(endpoint),
                signed_later=not sign_now,
            )
            self.registry.publish(manifest)
        except BaseException:
            holder.version = None
            raise
        if not sign_now:
            self._signing = self._signer.submit(self._sign, manifest, published)
        self.stats.versions_published += 1
        return manifest

    def wait_signed(self) -> None:
        """Wait until the version published last with ``sign_later`` is signed (its digests in
        the registry); re-raises what failed its signing."""
        signing, self._signing = self._signing, None
        if signing is not None:
            signing.result()

    def begin_write(self, *, readers: int = 0, timeout_s: float | None = None) -> None:
        """The trainer is about to write the storage it published in place: wait until
        ``readers`` receivers released the live version (the hold; ``TimeoutError`` past
        ``timeout_s``, default the registry's), then bump the write counter, so a receiver
        still reading fails closed instead of applying torn bytes. The version is no longer
        live. Nothing to do after snapshot publishing."""
        self.wait_signed()  # the digests are of the bytes as published
        home = self._home
        if home is None or home.version is None:
            return
        if readers:
            self.registry.wait_released(self.config.model_id, home.version, readers, timeout_s)
        home.counter.add_(1)
        self.backend.synchronize()  # the bump lands before any write the trainer queues next
        home.version = None

    def retire(self, version: int) -> None:
        """Free ``version``'s arena for reuse; receivers must be done reading it."""
        self.wait_signed()
        for holder in self._holders():
            if holder.version == version:
                holder.version = None
                return
        raise ValueError(f"retire v{version}: not a live version (live: {self.live_versions()})")

    def close(self) -> None:
        """Deregister every arena, and the in-place storage; then re-raise what failed the
        last signing, if anything did."""
        try:
            self.wait_signed()
        finally:
            self._signer.shutdown()
            for arena in self._arenas:
                self.transport.deregister(arena.registration)
            self._arenas.clear()
            if self._home is not None:
                self.transport.deregister(self._home.registration)
                self._home = None

    def _holders(self) -> list[_Arena | _Home]:
        """Whatever holds a version: the snapshot arenas, and the in-place storage."""
        return [*self._arenas, *([self._home] if self._home else [])]

    def _sign(self, manifest: SourceManifest, shards: Sequence[torch.Tensor]) -> None:
        signatures = [_signature(d, t) for d, t in zip(manifest.tensors, shards, strict=True)]
        self._signer_registry.publish_signatures(
            manifest,
            Signatures(
                names_digest=manifest.names_digest,
                digests=tuple(s["digest"] for s in signatures),
                checksums=tuple(s["checksum"] for s in signatures),
            ),
        )

    def _check_shard(self, d: ShardDescriptor, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{d.name}: shard must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != d.local_shape:
            raise ValueError(
                f"{d.name}: shard shape {tuple(t.shape)} != descriptor {d.local_shape}"
            )
        if t.dtype != DTYPES[d.dtype]:
            raise ValueError(f"{d.name}: shard dtype {t.dtype} != descriptor dtype {d.dtype}")
        if not self.backend.is_accel_tensor(t):
            raise ValueError(f"{d.name}: shard on {t.device} is not a {self.backend.name} tensor")

    def _home_of(self, shards: Sequence[tuple[ShardDescriptor, torch.Tensor]]) -> _Home:
        """The registration of the storage every shard is a contiguous view of."""
        storage = shards[0][1].untyped_storage()
        base, nbytes = storage.data_ptr(), storage.nbytes()
        for d, t in shards:
            if t.untyped_storage().data_ptr() != base or not t.is_contiguous():
                raise ValueError(
                    f"{d.name}: field 'in_place': not a contiguous view of the storage of "
                    f"{shards[0][0].name}; in-place publishing reads one registered storage"
                )
        home = self._home
        if home is not None and home.version is not None:
            raise ValueError(
                f"publish in place: v{home.version} is still live in the trainer's storage; "
                "call begin_write() before writing it again"
            )
        if home is not None and (home.base, home.nbytes) == (base, nbytes):
            return home
        if home is not None:
            self.transport.deregister(home.registration)
        whole = torch.empty(0, dtype=torch.uint8, device=storage.device)
        whole.set_(storage)  # (nbytes,) uint8 over the whole storage
        counter = torch.zeros(1, dtype=torch.int64, device=storage.device)
        registration = self.transport.register([whole, counter])
        self.stats.registrations += 1
        self.stats.bytes_registered += nbytes
        # a transport may move the storage as it registers it (the simulator's moves it into
        # shared memory; every view follows): its address is the registered one
        self._home = _Home(registration.regions[0].addr, nbytes, registration, counter)
        return self._home

    def _arena_for(self, descs: Sequence[ShardDescriptor]) -> _Arena:
        layout = layout_signature(descs, tp=self.tp, pp=self.pp, ep=self.ep)
        free = [a for a in self._arenas if a.version is None]
        for arena in free:
            if arena.layout == layout:
                return arena
        if len(self._arenas) >= self.config.max_live_versions:
            if not free:
                raise RuntimeError(
                    f"publish: {len(self._arenas)} live versions {self.live_versions()} hold every "
                    "arena; retire one first"
                )
            stale = free[0]  # the layout changed: replace a free arena
            self.transport.deregister(stale.registration)
            self._arenas.remove(stale)
        offsets, nbytes = arena_offsets(descs)
        buffer = torch.zeros(nbytes, dtype=torch.uint8, device=self.backend.torch_device())
        registration = self.transport.register([buffer])
        self.stats.registrations += 1
        self.stats.bytes_registered += nbytes
        arena = _Arena(buffer, registration, layout, offsets)
        self._arenas.append(arena)
        return arena
