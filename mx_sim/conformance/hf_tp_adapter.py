"""The sharded reference adapter over transformers' own tensor parallelism.

Each rank of :class:`HfTpAdapter` is the simulator's HF TP engine
(:mod:`mx_sim.refit.hf_tp_engine`): a real HF model loaded by ``from_pretrained`` under
``DistributedConfig(tp_size)`` from a checkpoint of the tiny model, storages compacted, KV heads
repeated when TP exceeds them. Its layout is read off the DTensor placements (plus the declared
repeated KV rows), its forward is the model's own (the all-gather of vocab-parallel logits
included), its loader the shared sharded one.

transformers builds its device mesh over the default process group, so a rank needs the
replica as its process's world: :attr:`ranks_as_processes` tells the suite to run each rank in
a process of its own, sending it this adapter (which pickles as its class and backend).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers.utils import logging

from mx_sim.conformance.sharded_adapter import ShardedModel, ShardedReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.refit.hf_tp_engine import engine_layout, load_tp_model
from mx_sim.refit.multiprocess import HF_TP_FAMILIES


class HfTpAdapter(ShardedReferenceAdapter):
    """Sharded ranks of transformers' TP engine; one process per rank."""

    ranks_as_processes = True
    families = HF_TP_FAMILIES  # the families with a transformers TP plan

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.backend,)

    def build_sharded(
        self, kind: str, *, tp_size: int, tp_rank: int, seed: int = 0, **config: Any
    ) -> ShardedModel:
        world = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else None
        if world != (tp_size, tp_rank):
            raise ValueError(
                f"build_sharded(tp_size={tp_size}, tp_rank={tp_rank}): transformers' TP needs "
                f"the replica as this process's default group, which is {world}"
            )
        logging.disable_progress_bar()
        # one checkpoint for the replica, as an engine loads one: under an initialized process
        # group transformers' save_pretrained writes on rank 0 only
        with tempfile.TemporaryDirectory(prefix="mx-hf-tp-") as own:
            checkpoint = _broadcast_path(Path(own))
            if tp_rank == 0:
                self.build_model(kind, seed=seed, **config).save_pretrained(checkpoint)
            dist.barrier()
            model = load_tp_model(checkpoint, tp_size)
            dist.barrier()  # rank 0 removes its directory once every rank has loaded
        local, layout, meta = engine_layout(model, tp_size)

        def forward(input_ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids).logits

        return ShardedModel(model, local, layout, meta, tp_size, tp_rank, forward)


def _broadcast_path(path: Path, size: int = 4096) -> Path:
    """Rank 0's ``path`` on every rank (UTF-8 bytes over the default group, no pickle)."""
    raw = torch.zeros(size, dtype=torch.uint8)
    if dist.get_rank() == 0:
        data = str(path).encode()
        raw[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.broadcast(raw, src=0)
    return Path(bytes(raw[raw.nonzero()].flatten().tolist()).decode())


def hf_tp_adapter() -> HfTpAdapter:
    """The HF TP reference adapter on the CPU mock backend."""
    return HfTpAdapter(CpuMockBackend())
