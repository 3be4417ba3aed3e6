"""Tensor discovery: every accelerator byte of a model that a transport must register, once.

An engine adapter runs post-load processing under :func:`capture_tensor_attrs`, then calls
:func:`discover` (:func:`adopt_hidden_tensors`, then :func:`collect_module_tensors`). The rules:

- Parameters first, then buffers, every qualified name (tied ones included), keeping only tensors
  the backend accepts: the default CUDA backend never publishes a CPU tensor.
- Tensors are grouped by storage. Within a storage, overlapping byte extents form a cluster that
  one of its tensors must span: that tensor is published (first name wins among equals) and the
  others become its ``aliases``. Deduplicating by start pointer alone would let a smaller view
  seen first shadow a larger tensor at the same address.
- A storage holding a non-contiguous tensor (or a cluster no single tensor spans) is published
  whole, as a flat ``uint8`` view named ``<first non-contiguous name>.__storage``.
- Zero-element tensors are published under their own name and never deduplicated: distinct
  empty tensors may share a null pointer.
- Hidden tensors (held by plain objects on a module, not registered) are adopted as
  non-persistent buffers named ``_mx_<escaped path>``, so both ends of a transfer publish them.

Hidden-tensor path grammar (``HiddenTensor.path``, relative to the owning module)::

    path := ATTR step*                 ATTR: the module's instance attribute
    step := "." NAME                   attribute of a plain object (instance dict or __slots__)
          | "[" INDEX "]"              list or tuple element
          | "[" KEY "]"                dict entry: repr() of a str/int/float/bool/None key,
                                       str() of a torch.dtype, "(k1, k2)" for tuples of those;
                                       "#N" (position in the dict) for any other key

Example: ``quant_method.config.scales['a1']`` and ``cache[(torch.float16, 3)]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import reprlib
import types
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import torch
from torch import nn

from mx_reference.backends import AcceleratorBackend, resolve_backend

log = logging.getLogger(__name__)

MAX_HIDDEN_DEPTH = 20  # nesting levels below a module attribute that the hidden scan follows
STORAGE_SUFFIX = ".__storage"
ADOPTED_PREFIX = "_mx_"


# ---------------------------------------------------------------------------------------------
# Published set and manifest


@dataclass(frozen=True)
class TensorRecord:
    """One manifest line: what a peer needs to match an entry without seeing its bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype without the "torch." prefix, e.g. "bfloat16"
    stride: tuple[int, ...]
    storage_offset: int  # in elements
    nbytes: int
    aliases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PublishedTensor:
    """One entry of the published set: register ``tensor``'s bytes under ``name``.

    ``tensor`` is contiguous: the module's own tensor object (a Parameter stays a Parameter, so
    write into it under ``torch.no_grad()``), or a flat ``uint8`` view of a whole storage for
    ``<name>.__storage`` entries. ``aliases`` are the other
    module tensor names whose bytes lie inside this entry (for a storage entry, every tensor in
    it); a receiver restores ties and views from them.
    """

    name: str
    tensor: torch.Tensor = field(repr=False)
    aliases: tuple[str, ...] = ()

    @property
    def record(self) -> TensorRecord:
        t = self.tensor
        return TensorRecord(
            name=self.name,
            shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            stride=tuple(t.stride()),
            storage_offset=int(t.storage_offset()),
            nbytes=t.nbytes,
            aliases=self.aliases,
        )


@dataclass(frozen=True)
class DiscoveryManifest:
    """The deterministic description of a published set, for comparing two processes."""

    records: tuple[TensorRecord, ...]

    @classmethod
    def of(cls, published: list[PublishedTensor]) -> DiscoveryManifest:
        return cls(tuple(p.record for p in published))

    def digest(self) -> str:
        """SHA-256 (hex) of the name sequence: each entry's name and aliases, in order."""
        h = hashlib.sha256()
        for r in self.records:
            h.update("\t".join((r.name, *r.aliases)).encode() + b"\n")
        return h.hexdigest()

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> DiscoveryManifest:
        """Parse :meth:`to_json` output; ``ValueError`` names the offending field."""
        try:
            return msgspec.json.decode(text, type=cls)
        except msgspec.DecodeError as exc:
            raise ValueError(f"invalid discovery manifest: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Enumeration


def _require_module(module: object, func: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{func}: module must be a torch.nn.Module, got "
            f"{type(module).__qualname__} {reprlib.repr(module)}"
        )


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _module_paths(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (qualified name, module), pre-order; a shared submodule appears under each name.

    Unlike ``named_modules()`` this keeps duplicates (so ties through shared modules become
    aliases) and skips a child that is its own ancestor (module cycles).
    """
    out: list[tuple[str, nn.Module]] = []
    ancestors: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        out.append((prefix, module))
        ancestors.add(id(module))
        for name, child in module._modules.items():
            if child is not None and id(child) not in ancestors:
                visit(_qualify(prefix, name), child)
        ancestors.discard(id(module))

    visit("", root)
    return out


def iter_module_tensors(
    module: nn.Module, backend: AcceleratorBackend | None = None
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(qualified name, tensor, kind)`` for every accelerator parameter, then buffer.

    ``kind`` is ``"parameter"`` or ``"buffer"``. Every name is yielded, tied ones included (the
    same Parameter under two names appears twice); :func:`collect_module_tensors` dedups.
    """
    _require_module(module, "iter_module_tensors")  # here, not on the first next()
    return _iter_module_tensors(_module_paths(module), resolve_backend(backend).is_accel_tensor)


def _iter_module_tensors(
    paths: list[tuple[str, nn.Module]], is_accel: Callable[[object], bool]
) -> Iterator[tuple[str, torch.Tensor, str]]:
    for kind, table in (("parameter", "_parameters"), ("buffer", "_buffers")):
        for prefix, m in paths:
            for name, t in getattr(m, table).items():
                if t is not None and is_accel(t):
                    yield _qualify(prefix, name), t, kind


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """A flat contiguous ``uint8`` tensor over the whole storage of ``t`` (same device)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _extent(t: torch.Tensor) -> tuple[int, int, int]:
    """``(storage base pointer, first byte, end byte)`` of a non-empty tensor in its storage."""
    itemsize = t.element_size()
    start = int(t.storage_offset()) * itemsize
    if t.is_contiguous():
        end = start + t.nbytes
    else:  # torch strides are never negative: the last element is at sum((size-1)*stride)
        end = (
            start
            + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))) * itemsize
        )
    return t.untyped_storage().data_ptr(), start, end


# (position in iteration order, name, tensor) of one storage's tensors
_Member = tuple[int, str, torch.Tensor]


def _publish_storage(members: list[_Member]) -> list[tuple[int, PublishedTensor]]:
    """The entries that cover one storage's tensors exactly once, keyed by first position."""
    if all(t.is_contiguous() for _, _, t in members):
        entries = []
        for cluster in _overlap_clusters(members):
            span = _spanning(cluster)
            if span is None:
                break
            aliases = tuple(name for _, name, _ in cluster if name != span[1])
            entries.append((cluster[0][0], PublishedTensor(span[1], span[2], aliases)))
        else:
            return entries
    owner = next((m for m in members if not m[2].is_contiguous()), members[0])
    aliases = tuple(name for _, name, _ in members)
    return [
        (members[0][0], PublishedTensor(owner[1] + STORAGE_SUFFIX, storage_view(owner[2]), aliases))
    ]


def _overlap_clusters(members: list[_Member]) -> list[list[_Member]]:
    """Members grouped into maximal runs of overlapping byte extents, each in position order."""
    by_start = sorted(members, key=lambda m: _extent(m[2])[1])
    clusters: list[list[_Member]] = []
    cluster_end = -1
    for m in by_start:
        _, start, end = _extent(m[2])
        if start >= cluster_end:
            clusters.append([])
        clusters[-1].append(m)
        cluster_end = max(cluster_end, end)
    return [sorted(c) for c in clusters]


def _spanning(cluster: list[_Member]) -> _Member | None:
    """The first member (by position) whose extent is the cluster's whole extent, if any."""
    extents = [_extent(t)[1:] for _, _, t in cluster]
    lo = min(s for s, _ in extents)
    hi = max(e for _, e in extents)
    return next((m for m, ext in zip(cluster, extents, strict=True) if ext == (lo, hi)), None)


def collect_module_tensors(
    module: nn.Module, backend: AcceleratorBackend | None = None
) -> list[PublishedTensor]:
    """The published set of ``module``: every accelerator byte of its parameters and buffers once.

    Entries come in first-seen order (the position of the first tensor they cover), so two
    processes that built the same model publish the same names in the same order.
    """
    _require_module(module, "collect_module_tensors")
    # Plain lists rather than (name, tensor) rows: fewer surviving objects for the GC to trace.
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for name, t, _ in iter_module_tensors(module, backend):
        names.append(name)
        tensors.append(t)
    bases = [t.untyped_storage().data_ptr() if t.numel() else 0 for t in tensors]
    counts = Counter(bases)
    # Storages needing more than "publish the tensor": shared ones and non-contiguous ones.
    shared: dict[int, list[_Member]] = {}
    for pos, (t, base) in enumerate(zip(tensors, bases, strict=True)):
        if base and (counts[base] > 1 or not t.is_contiguous()):
            shared.setdefault(base, []).append((pos, names[pos], t))
    placed: dict[int, list[PublishedTensor]] = {}  # position -> entries first seen there
    for members in shared.values():
        for pos, entry in _publish_storage(members):
            placed.setdefault(pos, []).append(entry)
    published: list[PublishedTensor] = []
    for pos, (name, t, base) in enumerate(zip(names, tensors, bases, strict=True)):
        if base in shared:
            published.extend(placed.get(pos, ()))
        else:  # zero-element tensors land here too: never deduplicated
            published.append(PublishedTensor(name, t))
    return published


# ---------------------------------------------------------------------------------------------
# Hidden tensors


class HiddenTensor(NamedTuple):
    """An accelerator tensor held outside the registered parameters and buffers."""

    owner: str  # qualified name of the module whose attribute leads to it ("" for the root)
    path: str  # from that module, in the grammar of this module's docstring
    tensor: torch.Tensor


_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device})
# Sets are not walked: their order depends on addresses, so no name could be deterministic.
_NOT_WALKED = (type, nn.Module, types.ModuleType, set, frozenset)
# nn.Module's own bookkeeping (registered tensors, submodules, hooks) is not model state.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _key_text(key: object) -> str | None:
    """A process-independent rendering of a dict key, or None if its repr may hold an address."""
    if type(key) in (str, int, float, bool, type(None)):
        return repr(key)
    if isinstance(key, torch.dtype):
        return str(key)
    if type(key) is tuple:
        parts = [_key_text(k) for k in key]
        if None in parts:
            return None
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"  # type: ignore[arg-type]
    return None


def _slot_names(cls: type) -> tuple[str, ...]:
    names: list[str] = []
    for klass in reversed(cls.__mro__):  # base classes' slots first
        slots = klass.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return tuple(n for n in names if not n.startswith("__"))


class _HiddenScan:
    """One scan's state: objects seen (with the shallowest depth) and tensors reported."""

    def __init__(self, backend: AcceleratorBackend) -> None:
        self.is_accel = backend.is_accel_tensor
        # id -> (shallowest depth seen, the object itself: holding it keeps the id unique)
        self.seen: dict[int, tuple[int, object]] = {}
        self.reported: set[int] = set()
        self.found: list[tuple[str, torch.Tensor]] = []
        self.slot_names: dict[type, tuple[str, ...]] = {}

    def visit(self, obj: object, path: str, depth: int) -> None:
        """Scan ``obj`` found at ``path``; an exception skips only this object."""
        try:
            self._visit(obj, path, depth)
        except Exception as exc:  # e.g. a lazy proxy raising from __class__ or __dict__
            log.debug("hidden scan: skipping %s: %r", path, exc)

    def _visit(self, obj: object, path: str, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self.reported and obj.numel() > 0 and self.is_accel(obj):
                self.reported.add(id(obj))
                self.found.append((path, obj))
            return
        if isinstance(obj, _NOT_WALKED) or depth >= MAX_HIDDEN_DEPTH:
            return
        seen = self.seen.get(id(obj))
        if seen is not None and seen[0] <= depth:  # a cycle, or already walked from higher up
            return
        self.seen[id(obj)] = (depth, obj)
        depth += 1
        # Iterate snapshots: scanning may run code (properties of proxies) that mutates them.
        if isinstance(obj, (list, tuple)):
            for i, v in enumerate(list(obj)):
                if type(v) not in _ATOMIC:
                    self.visit(v, f"{path}[{i}]", depth)
        elif isinstance(obj, dict):
            for i, (k, v) in enumerate(list(obj.items())):
                if type(v) not in _ATOMIC:
                    self.visit(v, f"{path}[{_key_text(k) or f'#{i}'}]", depth)
        else:
            for name, v in self.attributes(obj):
                if type(v) not in _ATOMIC:
                    self.visit(v, f"{path}.{name}", depth)

    def attributes(self, obj: object) -> list[tuple[str, Any]]:
        """``obj``'s instance-dict items and set slots, names starting with ``__`` left out."""
        attrs = getattr(obj, "__dict__", None)
        items = (
            [kv for kv in list(attrs.items()) if kv[0][:2] != "__"] if type(attrs) is dict else []
        )
        cls = type(obj)
        slots = self.slot_names.get(cls)
        if slots is None:
            slots = self.slot_names[cls] = _slot_names(cls)
        for name in slots:
            try:
                items.append((name, getattr(obj, name)))
            except AttributeError:  # an unset slot
                continue
        return items


def find_hidden_accel_tensors(
    module: nn.Module, backend: AcceleratorBackend | None = None
) -> list[HiddenTensor]:
    """Accelerator tensors reachable from the instance attributes of ``module``'s submodules.

    Follows lists, tuples, dicts, and the instance dicts and ``__slots__`` of plain objects, down
    to :data:`MAX_HIDDEN_DEPTH` levels below a module attribute (the attribute's value is level
    0). Never walks classes, modules, Python module objects, sets (their order depends on
    addresses, so no name could be deterministic) or nn.Module's own bookkeeping (hooks); names
    starting with ``__`` are skipped. Cycle-safe; an exception raised while reading one
    attribute skips only that attribute. Each tensor object is reported once, under its first
    path; zero-element tensors are not reported. A hidden reference to a registered parameter
    or buffer is reported like any other (:func:`adopt_hidden_tensors` filters by coverage).
    """
    _require_module(module, "find_hidden_accel_tensors")
    scan = _HiddenScan(resolve_backend(backend))
    hidden: list[HiddenTensor] = []
    walked: set[int] = set()
    for owner, m in _module_paths(module):
        if id(m) in walked:
            continue
        walked.add(id(m))
        for name, value in list(vars(m).items()):
            if name not in _MODULE_INTERNALS and type(value) not in _ATOMIC and name[:2] != "__":
                scan.visit(value, name, 0)
        hidden.extend(HiddenTensor(owner, path, t) for path, t in scan.found)
        scan.found.clear()
    return hidden


# ---------------------------------------------------------------------------------------------
# Adoption and capture


class _Coverage:
    """Bytes the published set will cover: whole storages, and extents per storage."""

    def __init__(self) -> None:
        self.whole: set[int] = set()
        self.extents: dict[int, list[tuple[int, int]]] = {}

    def add(self, t: torch.Tensor) -> None:
        if t.numel() == 0:
            return
        base, start, end = _extent(t)
        if t.is_contiguous():
            self.extents.setdefault(base, []).append((start, end))
        else:  # collect publishes the whole storage
            self.whole.add(base)

    def covers(self, t: torch.Tensor) -> bool:
        base, start, end = _extent(t)
        if base in self.whole:
            return True
        for lo, hi in sorted(self.extents.get(base, ())):
            if lo <= start < hi:
                start = hi
        return start >= end


_UNSAFE = re.compile(r"[^0-9A-Za-z_]+")


def adopted_buffer_name(path: str) -> str:
    """``_mx_`` + ``path`` with each run of characters outside ``[0-9A-Za-z_]`` made one ``_``.

    ``quant_method.config.a1_gscale`` -> ``_mx_quant_method_config_a1_gscale``.
    """
    return ADOPTED_PREFIX + _UNSAFE.sub("_", path).rstrip("_")


def adopt_hidden_tensors(module: nn.Module, backend: AcceleratorBackend | None = None) -> list[str]:
    """Register each hidden accelerator tensor as a non-persistent buffer of the module holding it.

    Skips tensors whose bytes the registered parameters and buffers (or an earlier adoption)
    already cover, so a second call adds nothing. The buffer name is
    :func:`adopted_buffer_name` of the hidden path, suffixed ``_1``, ``_2``, ... while the module
    already has that attribute. The buffer is the hidden tensor object itself, so later in-place
    writes reach its holder. Returns the qualified names added, in scan order.
    """
    _require_module(module, "adopt_hidden_tensors")
    hidden = find_hidden_accel_tensors(module, backend)
    if not hidden:
        return []
    coverage = _Coverage()
    storages = {h.tensor.untyped_storage().data_ptr() for h in hidden}
    for _, t, _ in iter_module_tensors(module, backend):
        if t.untyped_storage().data_ptr() in storages:  # only these can cover a hidden tensor
            coverage.add(t)
    owners = dict(_module_paths(module))
    adopted = []
    for owner, path, t in hidden:
        if coverage.covers(t):
            continue
        m = owners[owner]
        base = name = adopted_buffer_name(path)
        suffix = 0
        while hasattr(m, name):
            suffix += 1
            name = f"{base}_{suffix}"
        m.register_buffer(name, t, persistent=False)
        coverage.add(t)
        adopted.append(_qualify(owner, name))
    if adopted:
        log.info("adopted %d hidden accelerator tensors", len(adopted))
    return adopted


@contextlib.contextmanager
def capture_tensor_attrs(
    module: nn.Module, backend: AcceleratorBackend | None = None
) -> Iterator[list[str]]:
    """Turn bare accelerator-tensor assignments on ``module``'s submodules into buffers.

    Wrap post-load processing (e.g. FP8 scale creation) in it so that ``layer.scale = t`` on
    either end of a transfer becomes a non-persistent buffer both ends publish. An assignment is
    captured when the value is an accelerator tensor but not a Parameter, and the name is not
    already a parameter, buffer, submodule or class attribute of that module; everything else
    goes through the normal ``nn.Module.__setattr__``. Submodules are the ones present on entry;
    other modules are never affected. Yields the list of captured qualified names, filled in as
    assignments happen. ``nn.Module.__setattr__`` is restored on exit, also on exceptions.
    """
    _require_module(module, "capture_tensor_attrs")
    is_accel = resolve_backend(backend).is_accel_tensor
    prefixes = {id(m): prefix for prefix, m in reversed(_module_paths(module))}
    original = nn.Module.__setattr__
    captured: list[str] = []

    def capturing_setattr(self: nn.Module, name: str, value: Any) -> None:
        prefix = prefixes.get(id(self))
        if (
            prefix is not None
            and isinstance(value, torch.Tensor)
            and not isinstance(value, nn.Parameter)
            and is_accel(value)
            and name not in self._parameters
            and name not in self._buffers
            and name not in self._modules
            and not hasattr(type(self), name)
        ):
            self.__dict__.pop(name, None)  # a plain attribute of that name would block the buffer
            self.register_buffer(name, value, persistent=False)
            captured.append(_qualify(prefix, name))
        else:
            original(self, name, value)

    nn.Module.__setattr__ = capturing_setattr  # type: ignore[method-assign]
    try:
        yield captured
    finally:
        nn.Module.__setattr__ = original  # type: ignore[method-assign]


def discover(module: nn.Module, backend: AcceleratorBackend | None = None) -> list[PublishedTensor]:
    """What an engine adapter publishes: :func:`adopt_hidden_tensors`, then collect."""
    adopt_hidden_tensors(module, backend)
    return collect_module_tensors(module, backend)
