"""Atomic, in-place apply of a staged weight version, and the digests that guard it.

Apply is all or nothing: every staged tensor is checked against its parameter (name, shape,
dtype, device) before the first byte is written, then copied with ``param.data.copy_`` under
``no_grad``. ``.data`` is never rebound, so parameter storage addresses (and CUDA graphs that
captured them) stay valid. A failed check raises ``ValueError`` and leaves the model untouched.

Translation can leave a tensor :class:`~mx_reference.refit.layouts.Regrouped`: its HF shape is
no view of the pulled bytes, but another grouping of them is. Apply copies such a tensor straight
into the parameter, so the regrouping costs no pass of its own;
:class:`~mx_reference.refit.layouts.StagedTensors` hands plain tensors to anyone who reads the
staged version otherwise (an engine's own loader).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from mx_reference.refit.layouts import Pieced, Regrouped, Staged, StagedTensors


def _entries(staged: Mapping[str, torch.Tensor]) -> Mapping[str, Staged]:
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
            if isinstance(new, (Regrouped, Pieced)):
                new.copy_into(params[name].data)
            else:
                params[name].data.copy_(new)
    return list(staged)
