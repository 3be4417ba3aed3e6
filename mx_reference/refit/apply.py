"""Atomic, in-place apply of a staged weight version, and the digests that guard it.

Apply is all or nothing: every staged tensor is checked against its parameter (name, shape,
dtype, device) before the first byte is written, then copied with ``param.data.copy_`` under
``no_grad``. ``.data`` is never rebound, so parameter storage addresses (and CUDA graphs that
captured them) stay valid. A failed check raises ``ValueError`` and leaves the model untouched.

Translation can leave a tensor :class:`Regrouped`: its HF shape is no view of the pulled bytes,
but another grouping of them is. Apply copies such a tensor straight into the parameter, so the
regrouping costs no pass of its own; :class:`StagedTensors` hands plain tensors to anyone who
reads the staged version otherwise (an engine's own loader).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Regrouped:
    """``source.reshape(shape)``, not yet made: the tensor of ``shape`` whose elements, in
    row-major order, are those of ``source``.

    Megatron's QKV de-interleaves into q, k and v whose rows are strided per query group: no
    view in HF shape ``[H·D, in]``, but a view as ``[G, p·D, in]``. Copying that view into
    ``param.view(G, p·D, in)`` is the whole de-interleave.
    """

    source: torch.Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        assert self.source.numel() == self.shape.numel(), (self.source.shape, self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    @property
    def device(self) -> torch.device:
        return self.source.device

    def to(self, device: torch.device) -> Regrouped:
        return Regrouped(self.source.to(device), self.shape)

    def materialize(self) -> torch.Tensor:
        return self.source.reshape(self.shape)

    def copy_into(self, dst: torch.Tensor) -> None:
        if dst.is_contiguous():
            dst.view(self.source.shape).copy_(self.source)
        else:
            dst.copy_(self.materialize())


class StagedTensors(Mapping[str, torch.Tensor]):
    """A staged version's HF tensors by parameter name. ``entries`` may hold
    :class:`Regrouped` tensors: :func:`apply_in_place` copies them straight into their
    parameters, while reading one through the mapping materializes it."""

    def __init__(self, entries: Mapping[str, torch.Tensor | Regrouped]):
        self.entries = dict(entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        return entry.materialize() if isinstance(entry, Regrouped) else entry

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _entries(staged: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor | Regrouped]:
    return staged.entries if isinstance(staged, StagedTensors) else staged


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 over dtype, shape and the tensor's bytes (hex, first 32 chars)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    data = t.detach().contiguous().cpu()
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """One digest over names (sorted) and their tensor digests."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}={tensor_digest(tensors[name])};".encode())
    return h.hexdigest()[:32]


def model_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters by name; a tied parameter appears once, under its first name."""
    return dict(model.named_parameters())


def model_digest(model: torch.nn.Module) -> str:
    """Digest of every parameter: unchanged means no byte of the model changed."""
    return state_digest(model_parameters(model))


def check_staged(params: Mapping[str, torch.Tensor], staged: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the tensor and field if ``staged`` cannot be applied."""
    missing = sorted(set(params) - set(staged))
    if missing:
        raise ValueError(
            f"staged version lacks {len(missing)} parameter(s), e.g. {missing[0]!r}: "
            "a partial apply is refused"
        )
    for name, new in _entries(staged).items():
        if name not in params:
            raise ValueError(f"{name}: staged tensor has no parameter of that name in the model")
        old = params[name]
        for field, have, want in (
            ("shape", tuple(new.shape), tuple(old.shape)),
            ("dtype", new.dtype, old.dtype),
            ("device", new.device, old.device),
        ):
            if have != want:
                raise ValueError(f"{name}: staged {field} {have} != parameter {field} {want}")


def apply_in_place(
    params: Mapping[str, torch.Tensor], staged: Mapping[str, torch.Tensor]
) -> list[str]:
    """Check everything, then copy each staged tensor into its parameter; returns the names."""
    check_staged(params, staged)
    with torch.no_grad():
        for name, new in _entries(staged).items():
            if isinstance(new, Regrouped):
                new.copy_into(params[name].data)
            else:
                params[name].data.copy_(new)
    return list(staged)
