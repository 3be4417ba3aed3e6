"""Version registry over a torch.distributed Store (TCPStore, HashStore or FileStore).

Each model gets its own ``PrefixStore`` namespace. Per version ``v`` the keys are::

    v{v}/world          publisher count, fixed by the first publisher (compare_set)
    v{v}/claim/{rank}   add() counter: the first publish of a rank wins
    v{v}/rank/{rank}    that rank's encoded SourceManifest (msgpack, never pickle)
    v{v}/count          add() counter of ranks published
    v{v}/signed/{rank}  that rank's encoded Signatures, for a manifest published signed_later
    v{v}/released       add() counter of receivers done reading (in-place publishers wait on it)
    index               msgpack list of committed versions (compare_set loop)

A version enters ``index`` only when the last expected rank's ``add`` reaches the world size,
so a receiver never sees a half-published version. Every wait has a deadline.
"""

from __future__ import annotations

import time
from datetime import timedelta

import msgspec
import torch.distributed as dist

from mx_reference.refit.wire import (
    Signatures,
    SourceManifest,
    decode_manifest,
    decode_signatures,
    encode_manifest,
    encode_signatures,
    sign,
)

_POLL_S = 0.01
# Store.set / compare_set take bytes at runtime; torch's stubs say str, hence the ignores below.


class VersionRegistry:
    """Publish per-rank manifests, discover committed versions, retire old ones."""

    def __init__(
        self, store: dist.Store, *, timeout: float = 30.0, prefix: str = "mx/refit"
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"registry timeout must be positive, got {timeout}")
        self.store = store
        self.timeout = timeout
        self.prefix = prefix

    def connection(self) -> VersionRegistry:
        """This registry on its own connection to the store, for another thread: a TCPStore
        client runs one call at a time, so a ``set`` from one thread waits behind another
        thread's blocking ``wait`` on the same client."""
        clone = self.store.clone()  # type: ignore[attr-defined]  # at runtime, not in the stubs
        return VersionRegistry(clone, timeout=self.timeout, prefix=self.prefix)

    def _ns(self, model: str) -> dist.PrefixStore:
        if not model or "/" in model:
            raise ValueError(f"model id {model!r}: field 'model_id': must be non-empty, no '/'")
        return dist.PrefixStore(f"{self.prefix}/{model}/", self.store)

    def publish(self, manifest: SourceManifest) -> bool:
        """Publish one rank's manifest; True when this call completed (committed) the version.

        Publishing the same bytes again is a no-op; different bytes for an already published
        (version, rank) raise ``ValueError`` and change nothing.
        """
        m = manifest
        data = encode_manifest(m)
        decode_manifest(data)  # validate exactly what receivers will read
        ns, v = self._ns(m.model_id), m.version
        world = str(m.world_size).encode()
        agreed = ns.compare_set(f"v{v}/world", "", world)  # type: ignore[arg-type]
        if agreed != world:
            raise ValueError(
                f"manifest rank {m.rank} v{v}: field 'tp_size'/'pp_size'/'ep_size': "
                f"world {m.world_size} != {int(agreed)} of earlier publishers"
            )
        key = f"v{v}/rank/{m.rank}"
        if ns.add(f"v{v}/claim/{m.rank}", 1) > 1:
            ns.wait([key], timedelta(seconds=self.timeout))
            if ns.get(key) != data:
                raise ValueError(
                    f"manifest rank {m.rank}: field 'version': v{v} already published "
                    "with different content"
                )
            return False
        ns.set(key, data)  # type: ignore[arg-type]
        if ns.add(f"v{v}/count", 1) != m.world_size:
            return False
        self._update_index(ns, lambda vs: sorted({*vs, v}))
        return True

    def discover(self, model: str, min_version: int = 0) -> list[int]:
        """Committed versions ``>= min_version``, newest first."""
        return sorted((v for v in self._index(self._ns(model)) if v >= min_version), reverse=True)

    def wait_for_version(
        self, model: str, min_version: int = 0, timeout: float | None = None
    ) -> int:
        """The newest committed version ``>= min_version``, waiting up to ``timeout`` seconds."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not (found := self.discover(model, min_version)):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"model {model!r}: no committed version >= {min_version} "
                    f"within {timeout:.3g}s (a publisher rank may be missing)"
                )
            time.sleep(_POLL_S)
        return found[0]

    def manifests(self, model: str, version: int) -> list[SourceManifest]:
        """Every rank's manifest of a committed version, in rank order."""
        ns = self._ns(model)
        if version not in self._index(ns):
            raise LookupError(f"model {model!r}: version {version} is not committed (or retired)")
        # the index may name a version whose keys are gone or never came: wait the registry's
        # own deadline for them, not the store's
        world = int(self._get(ns, model, f"v{version}/world"))
        return [decode_manifest(self._get(ns, model, f"v{version}/rank/{r}")) for r in range(world)]

    def publish_signatures(self, manifest: SourceManifest, signatures: Signatures) -> None:
        """The digests of a manifest published ``signed_later``; ``ValueError`` when they
        do not sign it."""
        if not manifest.signed_later:
            raise ValueError(
                f"manifest rank {manifest.rank} v{manifest.version}: field 'signed_later': "
                "False, its descriptors carry their digests"
            )
        sign(manifest, signatures)
        key = f"v{manifest.version}/signed/{manifest.rank}"
        self._ns(manifest.model_id).set(key, encode_signatures(signatures))  # type: ignore[arg-type]

    def signed(self, manifest: SourceManifest) -> SourceManifest:
        """``manifest`` with its digests: as it is, or, published ``signed_later``, once its
        publisher has published them (waiting up to the registry's timeout)."""
        if not manifest.signed_later:
            return manifest
        m, ns = manifest, self._ns(manifest.model_id)
        try:
            data = self._get(ns, m.model_id, f"v{m.version}/signed/{m.rank}")
        except LookupError as exc:
            raise TimeoutError(
                f"model {m.model_id!r} v{m.version}: source rank {m.rank} published no digests "
                f"within {self.timeout:.3g} s of its manifest (signed_later)"
            ) from exc
        return sign(m, decode_signatures(data))

    def _get(self, ns: dist.PrefixStore, model: str, key: str) -> bytes:
        try:
            ns.wait([key], timedelta(seconds=self.timeout))
        except RuntimeError as exc:  # DistStoreError: the key did not appear in time
            raise LookupError(
                f"model {model!r}: registry key {key!r} missing after {self.timeout:.3g} s"
            ) from exc
        return ns.get(key)

    def release(self, model: str, version: int) -> int:
        """A receiver is done reading ``version`` from its sources; returns how many have
        said so."""
        return self._ns(model).add(f"v{version}/released", 1)

    def wait_released(
        self, model: str, version: int, readers: int, timeout: float | None = None
    ) -> None:
        """Wait until ``readers`` receivers released ``version`` (:meth:`release`);
        ``TimeoutError`` saying how many did."""
        timeout = self.timeout if timeout is None else timeout
        ns, deadline = self._ns(model), time.monotonic() + timeout
        while (done := ns.add(f"v{version}/released", 0)) < readers:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"model {model!r} v{version}: {done} of {readers} receivers released it "
                    f"within {timeout:.3g}s"
                )
            time.sleep(_POLL_S)

    def retire(self, model: str, version: int) -> bool:
        """Hide a version from discovery, then delete its keys. False if it was not committed."""
        ns = self._ns(model)
        if version not in self._index(ns):
            return False
        self._update_index(ns, lambda vs: [x for x in vs if x != version])
        world = int(ns.get(f"v{version}/world"))
        for r in range(world):
            ns.delete_key(f"v{version}/rank/{r}")
            ns.delete_key(f"v{version}/claim/{r}")
            ns.delete_key(f"v{version}/signed/{r}")
        for k in ("count", "world", "released"):
            ns.delete_key(f"v{version}/{k}")
        return True

    def retire_older_than(self, model: str, keep: int) -> list[int]:
        """Retire all but the ``keep`` newest committed versions; returns those retired."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        old = self.discover(model)[keep:]
        return [v for v in old if self.retire(model, v)]

    @staticmethod
    def _index(ns: dist.PrefixStore) -> list[int]:
        return _parse_index(ns.get("index")) if ns.check(["index"]) else []

    def _update_index(self, ns: dist.PrefixStore, change) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            cur = ns.get("index") if ns.check(["index"]) else b""
            old = _parse_index(cur) if cur else []
            new = msgspec.msgpack.encode(change(old))
            if ns.compare_set("index", cur, new) == new:  # type: ignore[arg-type]
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry index update did not settle within {self.timeout}s")
            time.sleep(_POLL_S)


def _parse_index(raw: bytes) -> list[int]:
    try:
        return msgspec.msgpack.decode(raw, type=list[int])
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ValueError(
            f"registry field 'index': not a msgpack list of versions ({exc})"
        ) from None
