"""Address ledgers: where every tensor a graph reads lives, keyed by its path in the inputs.

A captured graph reads fixed addresses. A ledger records, for each tensor reachable from the
inputs, its data pointer, storage pointer, shape, stride, dtype and device, keyed by a dotted
path such as ``kwargs.attn_metadata.layers.14.query_start_loc``. Diffing the capture ledger
against a replay ledger says exactly which input moved.

Traversal (see ``docs/graphs.md`` for the path grammar):

- tuples and lists by index, namedtuples by field name, mappings by key in insertion order;
- ``nn.Module`` by its parameters, buffers and submodules (the names ``named_parameters`` uses);
- any other object by its public ``__slots__`` (base classes first) and then its public
  ``__dict__`` entries; values are read from storage, never through a property getter;
- names starting with ``_`` are skipped; sets are skipped (no deterministic order);
- a cycle is cut where an object reappears among its own ancestors, so an object shared by
  several parents is reported at every path (as every layer's copy of shared attention metadata
  is), and tensor views are never deduplicated.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from mx_reference.backends import AcceleratorBackend, resolve_backend

_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, type)
_NO_CHILDREN = (set, frozenset, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)
MAX_LISTED = 20  # lines per section of an error message


class TensorAddress(NamedTuple):
    """One ledger entry: enough to tell a moved, resized or retyped input from a stable one."""

    data_ptr: int
    storage_ptr: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorAddress:
        return cls(
            t.data_ptr(),
            t.untyped_storage().data_ptr(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
            t.device,
        )


Ledger = dict[str, TensorAddress]


# How instances of a class are traversed (decided once per class, see _layout).
_LEAF, _MAPPING, _NAMEDTUPLE, _SEQUENCE, _MODULE, _OBJECT = range(6)
_Layout = tuple[int, tuple[tuple[str, Any], ...], frozenset[str]]
TensorPaths = list[tuple[str, torch.Tensor]]


_LAYOUTS: dict[type, _Layout] = {}


def _layout(cls: type) -> _Layout:
    """(kind, public slot descriptors base classes first, property names) for ``cls``."""
    if issubclass(cls, _LEAVES + _NO_CHILDREN):
        return _LEAF, (), frozenset()
    for kind, test in (
        (_MAPPING, lambda: issubclass(cls, Mapping)),
        (_NAMEDTUPLE, lambda: issubclass(cls, tuple) and hasattr(cls, "_fields")),
        (_SEQUENCE, lambda: issubclass(cls, (list, tuple))),
        (_MODULE, lambda: issubclass(cls, torch.nn.Module)),
    ):
        if test():
            return kind, (), frozenset()
    slots = []
    for klass in reversed(cls.__mro__):
        names = klass.__dict__.get("__slots__", ())
        for name in (names,) if isinstance(names, str) else names:
            descriptor = klass.__dict__.get(name)
            if not name.startswith("_") and isinstance(descriptor, types.MemberDescriptorType):
                slots.append((name, descriptor))
    properties = frozenset(
        name for klass in cls.__mro__ for name, v in vars(klass).items() if isinstance(v, property)
    )
    return _OBJECT, tuple(slots), properties


def _children(obj: Any, layout: _Layout) -> Iterator[tuple[str, object]]:
    """(path segment, value) pairs of ``obj`` in deterministic order; reads no property."""
    kind, slots, properties = layout
    if kind == _MAPPING:
        for key, value in obj.items():
            yield (key if isinstance(key, str) else f"[{key!r}]"), value
    elif kind == _NAMEDTUPLE:
        yield from zip(obj._fields, obj, strict=True)
    elif kind == _SEQUENCE:
        for i, value in enumerate(obj):
            yield str(i), value
    elif kind == _MODULE:
        yield from obj._parameters.items()
        yield from obj._buffers.items()
        yield from obj._modules.items()
    else:
        for name, descriptor in slots:
            try:
                yield name, descriptor.__get__(obj, type(obj))
            except AttributeError:  # an unset slot
                continue
        for name, value in getattr(obj, "__dict__", {}).items():
            if not name.startswith("_") and name not in properties:
                yield name, value


def _walk(
    obj: Any, path: str, keep: Callable[[object], bool], ancestors: set[int], out: TensorPaths
) -> None:
    if isinstance(obj, torch.Tensor):
        if keep(obj):
            out.append((path, obj))
        return
    cls = type(obj)
    layout = _LAYOUTS.get(cls) or _LAYOUTS.setdefault(cls, _layout(cls))
    if layout[0] == _LEAF or id(obj) in ancestors:
        return
    ancestors.add(id(obj))
    prefix = f"{path}." if path else ""
    for segment, child in _children(obj, layout):
        _walk(child, prefix + segment, keep, ancestors, out)
    ancestors.discard(id(obj))


def input_tensors(
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    metadata: object = None,
    *,
    backend: AcceleratorBackend | None = None,
) -> TensorPaths:
    """``(path, tensor)`` for every backend tensor under ``args``, ``kwargs`` and ``metadata``.

    Roots are named ``args``, ``kwargs`` and ``metadata``; ``metadata=None`` is left out.
    ``backend=None`` means CUDA, so CPU tensors are ignored unless a CPU backend is passed.
    """
    keep = resolve_backend(backend).is_accel_tensor
    out: TensorPaths = []
    _walk(tuple(args), "args", keep, set(), out)
    _walk(dict(kwargs or {}), "kwargs", keep, set(), out)
    if metadata is not None:
        _walk(metadata, "metadata", keep, set(), out)
    return out


def ledger_of(pairs: Iterable[tuple[str, torch.Tensor]]) -> Ledger:
    """Build a ledger from ``(path, tensor)`` pairs; ``ValueError`` if a path repeats."""
    ledger: Ledger = {}
    for path, t in pairs:
        if path in ledger:
            raise ValueError(
                f"two tensors map to path {path!r}: a key contains '.' or repeats another "
                "segment; rename it so every input has its own path"
            )
        ledger[path] = TensorAddress.of(t)
    return ledger


def extract_tensor_addresses(
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    metadata: object = None,
    *,
    backend: AcceleratorBackend | None = None,
) -> Ledger:
    """``{path: TensorAddress}`` for every backend tensor reachable from the inputs.

    Order is traversal order, so two calls over equal structures give equal, equally ordered
    ledgers. Raises ``ValueError`` if two tensors would share a path.
    """
    return ledger_of(input_tensors(args, kwargs, metadata, backend=backend))


def module_tensors(
    module: torch.nn.Module, *, backend: AcceleratorBackend | None = None, prefix: str = ""
) -> TensorPaths:
    """``(name, tensor)`` for a model's parameters and buffers, tied ones under each name."""
    out: TensorPaths = []
    _walk(module, prefix, resolve_backend(backend).is_accel_tensor, set(), out)
    return out


def module_address_ledger(
    module: torch.nn.Module, *, backend: AcceleratorBackend | None = None, prefix: str = ""
) -> Ledger:
    """Ledger of a model's parameters and buffers under their ``named_parameters`` names.

    Tied weights appear under every name. After an in-place refit (``param.data.copy_``) the
    diff against the ledger taken before it is empty; a refit that rebinds ``.data`` is not.
    """
    return ledger_of(module_tensors(module, backend=backend, prefix=prefix))


@dataclass(frozen=True)
class LedgerDiff:
    """What moved between two ledgers, in deterministic order (old ledger order, then new)."""

    missing: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    changed: tuple[tuple[str, int, int], ...] = ()  # (path, old data_ptr, new data_ptr)
    shape_changed: tuple[tuple[str, TensorAddress, TensorAddress], ...] = ()  # shape or stride
    dtype_changed: tuple[tuple[str, TensorAddress, TensorAddress], ...] = ()  # dtype or device

    def __bool__(self) -> bool:
        return bool(
            self.missing or self.added or self.changed or self.shape_changed or self.dtype_changed
        )

    def format(self, title: str) -> str:
        """A report in the style of vLLM's address check, one section per kind of change."""
        sections: list[tuple[str, list[str]]] = [
            ("Missing paths", list(self.missing)),
            ("Added paths", list(self.added)),
            ("Changed addresses", [f"{p}: {old:#x} -> {new:#x}" for p, old, new in self.changed]),
            (
                "Changed shapes",
                [
                    f"{p}: {tuple(a.shape)} stride {a.stride} -> {tuple(b.shape)} stride {b.stride}"
                    for p, a, b in self.shape_changed
                ],
            ),
            (
                "Changed dtypes",
                [
                    f"{p}: {a.dtype} on {a.device} -> {b.dtype} on {b.device}"
                    for p, a, b in self.dtype_changed
                ],
            ),
        ]
        lines = [title]
        for heading, items in sections:
            if not items:
                continue
            lines.append(f"  {heading}:")
            lines += [f"    {item}" for item in items[:MAX_LISTED]]
            if len(items) > MAX_LISTED:
                lines.append(f"    ... and {len(items) - MAX_LISTED} more")
        return "\n".join(lines)


def diff_ledgers(old: Ledger, new: Ledger) -> LedgerDiff:
    """Missing, added and changed paths from ``old`` (capture) to ``new`` (replay)."""
    if old == new:
        return LedgerDiff()
    changed, shapes, dtypes = [], [], []
    for path, a in old.items():
        b = new.get(path)
        if b is None or a == b:
            continue
        if (a.data_ptr, a.storage_ptr) != (b.data_ptr, b.storage_ptr):
            changed.append((path, a.data_ptr, b.data_ptr))
        if (a.shape, a.stride) != (b.shape, b.stride):
            shapes.append((path, a, b))
        if (a.dtype, a.device) != (b.dtype, b.device):
            dtypes.append((path, a, b))
    return LedgerDiff(
        missing=tuple(p for p in old if p not in new),
        added=tuple(p for p in new if p not in old),
        changed=tuple(changed),
        shape_changed=tuple(shapes),
        dtype_changed=tuple(dtypes),
    )


class InputAddressError(RuntimeError):
    """A graph's inputs no longer live where the graph reads them. ``.diff`` has the details."""

    def __init__(self, key: object, diff: LedgerDiff):
        super().__init__(
            diff.format(f"Input addresses for graph {key!r} are different during replay.")
        )
        self.key = key
        self.diff = diff


def check_ledger(key: object, captured: Ledger, current: Ledger) -> None:
    """Raise :class:`InputAddressError` unless ``current`` matches the ``captured`` ledger."""
    diff = diff_ledgers(captured, current)
    if diff:
        raise InputAddressError(key, diff)
