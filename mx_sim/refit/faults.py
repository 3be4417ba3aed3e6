"""Every refit fault the simulator can script, one entry each, and how it strikes.

A :class:`Fault` is what a user names (``mx-sim run --fault publisher_killed:2:0``): a kind, the
cycle (1-based) and the global rank it strikes. Its :class:`FaultKind` entry in :data:`FAULTS`
says how: through the struck trainer's transport (a
:class:`~mx_sim.sim_transport.FaultPlan` on the reads it serves), or by an action the rank
takes at the start of that cycle. Adding a fault is adding one entry here.

Reads are counted per trainer agent from 0; in the simulator's topologies each receiver rank
reads a given trainer at most once per cycle, so cycle ``c`` is served read ``c - 1`` of a
trainer that one receiver rank reads from.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from mx_sim.cluster.topology import TopologySpec
from mx_sim.sim_transport import FaultPlan

STORE_GONE_KEY = "fault/store_gone"


@dataclass(frozen=True)
class Fault:
    """One scripted fault: ``kind`` strikes in cycle ``cycle`` (1-based) on global ``rank``."""

    kind: str
    cycle: int = 2
    rank: int = 0
    delay_s: float = 4.0  # slow_rank: how late the rank publishes

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"fault kind {self.kind!r} not in {', '.join(FAULTS)}")
        if self.cycle < 1 or self.rank < 0:
            raise ValueError(f"fault {self.kind}: cycle must be >= 1 and rank >= 0")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``KIND[:cycle[:rank]]``, e.g. ``corrupt_shard:2:1``."""
        kind, *rest = text.split(":")
        if len(rest) > 2 or not all(part.isdigit() for part in rest):
            raise ValueError(
                f"fault {text!r}: expected KIND[:cycle[:rank]] with integer cycle/rank"
            )
        return cls(kind, *(int(part) for part in rest))

    @property
    def entry(self) -> FaultKind:
        return FAULTS[self.kind]

    def check_rank(self, spec: TopologySpec) -> None:
        """``ValueError`` unless ``rank`` is a rank of ``spec`` on the side this fault strikes."""
        side = spec.rank_info(self.rank).role if self.rank < spec.world_size else None
        if side != self.entry.side:
            raise ValueError(
                f"fault {self.kind} strikes a {self.entry.side} rank; rank {self.rank} of "
                f"{spec.label()} is {'outside its ranks' if side is None else 'a ' + side}"
            )

    def strikes(self, rank: int, cycle: int) -> bool:
        return self.rank == rank and self.cycle == cycle

    def transport_plan(self, rank: int) -> FaultPlan | None:
        """The ``FaultPlan`` for the transport of trainer ``rank`` (None: no transport fault)."""
        if rank != self.rank or self.entry.plan is None:
            return None
        return self.entry.plan(self.cycle - 1)


@dataclass(frozen=True)
class FaultContext:
    """What an action needs from the rank it runs in."""

    store: dist.Store
    timeout_s: float
    delay_s: float


@dataclass(frozen=True)
class FaultKind:
    """How one kind of fault strikes and what containing it looks like.

    ``side``: the role of the struck rank. ``plan(read)``: a transport fault on the struck
    trainer's agent, failing its ``read``-th served read. ``act(ctx)``: run by the struck rank at
    the start of the cycle; a trainer skips publishing when it returns True. ``kills``: the
    struck rank dies (no result of its own). ``error``: text one of the errors must contain
    (empty: any clear error). ``may_finish``: ranks may also end without an error (a late rank
    that still made its deadline).
    """

    name: str
    side: str
    doc: str
    error: str = ""
    kills: bool = False
    plan: Callable[[int], FaultPlan] | None = None
    act: Callable[[FaultContext], bool] | None = None
    may_finish: bool = False


def _sleep(ctx: FaultContext) -> bool:
    time.sleep(ctx.delay_s)
    return False


def _skip(ctx: FaultContext) -> bool:
    return True


def _exit(ctx: FaultContext) -> bool:
    os._exit(17)


def _store_gone(ctx: FaultContext) -> bool:
    """Ask the host of the store to shut it down, then wait until a call fails."""
    ctx.store.set(STORE_GONE_KEY, b"1")
    deadline = time.monotonic() + ctx.timeout_s
    while time.monotonic() < deadline:
        ctx.store.check([STORE_GONE_KEY])  # raises DistNetworkError once the server is gone
        time.sleep(0.01)
    return False


FAULTS: dict[str, FaultKind] = {
    k.name: k
    for k in (
        FaultKind(
            "publisher_killed",
            "trainer",
            "the trainer dies 64 bytes into serving a read",
            error="RemoteGone",
            kills=True,
            plan=lambda read: FaultPlan(die_on=read, die_after_bytes=64),
        ),
        FaultKind(
            "read_failed",
            "trainer",
            "the trainer's agent answers a read with an error",
            error="injected failure",
            plan=lambda read: FaultPlan(fail_on=read),
        ),
        FaultKind(
            "corrupt_shard",
            "trainer",
            "a byte of a served read is flipped in flight (silent, as on hardware)",
            error="mismatch",  # a digest (full models) or a checksum (sharded ranks)
            plan=lambda read: FaultPlan(corrupt_on=read, corrupt_bytes=1),
        ),
        FaultKind(
            "slow_rank",
            "trainer",
            "the trainer publishes delay_s late",
            act=_sleep,
            may_finish=True,
        ),
        FaultKind(
            "stale_version",
            "trainer",
            "the trainer never publishes the version",
            error="StaleVersion",
            act=_skip,
        ),
        FaultKind(
            "store_gone",
            "trainer",
            "the version registry's store shuts down mid-run",
            act=_store_gone,
        ),
        FaultKind(
            "receiver_killed",
            "receiver",
            "an inference rank exits before refitting",
            kills=True,
            act=_exit,
        ),
    )
}
