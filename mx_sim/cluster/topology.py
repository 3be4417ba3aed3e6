"""Refit topologies: trainer TP x PP x EP feeding receiver replicas of inference TP x PP.

Global ranks follow Megatron's order: TP fastest, then EP, then PP, for the trainers; the
receivers come after every trainer, replica by replica, TP fastest, then PP. So a rank's TP rank
differs from its global rank whenever PP or EP > 1, and always for receivers (using the global
rank as the TP rank was a bug in Dynamo PR #10901).

    trainer rank  = tp + TP * (ep + EP * pp)
    receiver rank = num_trainers + replica * (iTP * iPP) + itp + iTP * ipp
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    """Where one process sits. ``role`` is ``trainer`` or ``receiver``."""

    role: str
    global_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    ep_rank: int = 0
    ep_size: int = 1
    replica: int = 0


@dataclass(frozen=True)
class TopologySpec:
    """Trainer TP x PP x EP, inference TP x PP, and how many receiver replicas pull."""

    trainer_tp: int = 1
    trainer_pp: int = 1
    trainer_ep: int = 1
    inference_tp: int = 1
    inference_pp: int = 1
    replicas: int = 1

    def __post_init__(self) -> None:
        for field_name in (
            "trainer_tp",
            "trainer_pp",
            "trainer_ep",
            "inference_tp",
            "inference_pp",
            "replicas",
        ):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TopologySpec.{field_name} must be a positive int, got {value!r}")

    @property
    def num_trainers(self) -> int:
        return self.trainer_tp * self.trainer_pp * self.trainer_ep

    @property
    def ranks_per_replica(self) -> int:
        return self.inference_tp * self.inference_pp

    @property
    def num_receivers(self) -> int:
        return self.ranks_per_replica * self.replicas

    @property
    def world_size(self) -> int:
        return self.num_trainers + self.num_receivers

    def label(self) -> str:
        """Short name such as ``PP2xTP2->TP4`` (EP and replicas only when > 1)."""

        def side(tp: int, pp: int, ep: int) -> str:
            parts = [f"PP{pp}"] if pp > 1 else []
            parts += [f"EP{ep}"] if ep > 1 else []
            return "x".join(parts + [f"TP{tp}"])

        text = (
            f"{side(self.trainer_tp, self.trainer_pp, self.trainer_ep)}"
            f"->{side(self.inference_tp, self.inference_pp, 1)}"
        )
        return text + (f"x{self.replicas}" if self.replicas > 1 else "")

    def rank_info(self, global_rank: int) -> RankInfo:
        """The role and parallel coordinates of ``global_rank``."""
        if not 0 <= global_rank < self.world_size:
            raise ValueError(f"global_rank {global_rank} outside world of {self.world_size}")
        if global_rank < self.num_trainers:
            tp, rest = global_rank % self.trainer_tp, global_rank // self.trainer_tp
            ep, pp = rest % self.trainer_ep, rest // self.trainer_ep
            return RankInfo(
                "trainer",
                global_rank,
                tp,
                self.trainer_tp,
                pp,
                self.trainer_pp,
                ep,
                self.trainer_ep,
            )
        local = global_rank - self.num_trainers
        replica, within = divmod(local, self.ranks_per_replica)
        return RankInfo(
            "receiver",
            global_rank,
            within % self.inference_tp,
            self.inference_tp,
            within // self.inference_tp,
            self.inference_pp,
            replica=replica,
        )

    def ranks(self) -> list[RankInfo]:
        return [self.rank_info(r) for r in range(self.world_size)]

    def trainer_tp_group(self, pp: int, ep: int) -> list[int]:
        return [t + self.trainer_tp * (ep + self.trainer_ep * pp) for t in range(self.trainer_tp)]

    def trainer_pp_group(self, tp: int, ep: int) -> list[int]:
        return [tp + self.trainer_tp * (ep + self.trainer_ep * p) for p in range(self.trainer_pp)]

    def replica_group(self, replica: int) -> list[int]:
        """Every rank of one receiver replica (its TP x PP ranks, TP fastest)."""
        first = self.num_trainers + replica * self.ranks_per_replica
        return list(range(first, first + self.ranks_per_replica))

    def groups(self) -> dict[str, list[int]]:
        """Every process group the simulator builds, by name: trainer TP and PP, replicas."""
        out: dict[str, list[int]] = {}
        for pp in range(self.trainer_pp):
            for ep in range(self.trainer_ep):
                out[f"trainer_tp.pp{pp}.ep{ep}"] = self.trainer_tp_group(pp, ep)
        for tp in range(self.trainer_tp):
            for ep in range(self.trainer_ep):
                out[f"trainer_pp.tp{tp}.ep{ep}"] = self.trainer_pp_group(tp, ep)
        for replica in range(self.replicas):
            out[f"replica{replica}"] = self.replica_group(replica)
        return out

    def group_name(self, members: list[int]) -> str:
        """The name :meth:`groups` gives the group of exactly ``members``."""
        return next(name for name, m in self.groups().items() if m == members)

    def groups_of(self, global_rank: int) -> dict[str, list[int]]:
        """The groups ``global_rank`` belongs to, keyed by kind (``tp``, ``pp``, ``replica``)."""
        info = self.rank_info(global_rank)
        if info.role == "trainer":
            return {
                "tp": self.trainer_tp_group(info.pp_rank, info.ep_rank),
                "pp": self.trainer_pp_group(info.tp_rank, info.ep_rank),
            }
        return {"replica": self.replica_group(info.replica)}
