"""One refit rank under ``torchrun``, for topologies spanning machines (or node groups)::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr 127.0.0.1 \\
        --master-port 29500 -m mx_sim.refit.torchrun --model llama --trainer-tp 2 \\
        --inference-tp 2 --out /tmp/refit

``WORLD_SIZE`` must equal the topology's world size; each rank writes ``rank<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from mx_sim.cluster.launch import store_from_env
from mx_sim.cluster.topology import TopologySpec
from mx_sim.refit.multiprocess import RunConfig, rank_main
from mx_sim.sim_transport import TRANSPORTS


@dataclass(frozen=True)
class EnvStore:
    """Connects to the store torchrun set up (see :func:`mx_sim.cluster.launch.store_from_env`)."""

    timeout_s: float = 60.0

    def connect(self) -> dist.Store:
        return store_from_env("mx_sim/refit", self.timeout_s)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mx_sim.refit.torchrun")
    p.add_argument("--model", default="llama")
    dims = ("trainer-tp", "trainer-pp", "trainer-ep", "inference-tp", "inference-pp", "replicas")
    for flag in dims:
        p.add_argument(f"--{flag}", type=int, default=1)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--transport", choices=TRANSPORTS, default="sim")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    spec = TopologySpec(**{f.replace("-", "_"): getattr(args, f.replace("-", "_")) for f in dims})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != spec.world_size:
        raise ValueError(f"WORLD_SIZE={world} but topology {spec.label()} needs {spec.world_size}")
    cfg = RunConfig(
        spec, args.model, cycles=args.cycles, transport=args.transport, timeout_s=args.timeout
    )
    result = rank_main(rank, cfg, EnvStore(args.timeout))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=2, default=str))
    return 1 if result.get("error") or result.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
