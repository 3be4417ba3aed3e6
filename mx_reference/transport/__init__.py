"""Transports refit pulls tensors through: one protocol (``base``), real NIXL (``nixl``).

The simulated implementation with fault injection lives in ``mx_sim.transport``.
"""

from mx_reference.transport.base import (
    HandleBusy,
    LocalView,
    MemDesc,
    PreppedList,
    ReadPair,
    RegionNotFound,
    Registration,
    RemoteDesc,
    RemoteGone,
    TransferFailed,
    TransferTimeout,
    Transport,
    TransportError,
    XferHandle,
    coalesce,
    desc_of,
)

__all__ = [
    "HandleBusy",
    "LocalView",
    "MemDesc",
    "PreppedList",
    "ReadPair",
    "RegionNotFound",
    "Registration",
    "RemoteDesc",
    "RemoteGone",
    "TransferFailed",
    "TransferTimeout",
    "Transport",
    "TransportError",
    "XferHandle",
    "coalesce",
    "desc_of",
]
