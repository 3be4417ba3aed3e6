"""Transports refit pulls tensors through: descriptors, one protocol (``base``), NIXL (``nixl``).

The simulated implementation with fault injection lives in ``mx_sim.sim_transport``.
"""

from mx_reference.transport.base import (
    HandleBusy,
    PreppedList,
    RegionNotFound,
    Registration,
    RemoteGone,
    TransferFailed,
    TransferTimeout,
    Transport,
    TransportError,
    XferHandle,
)
from mx_reference.transport.memory import (
    LocalView,
    MemDesc,
    ReadPair,
    RemoteDesc,
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
