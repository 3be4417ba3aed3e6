"""The tie is lost: after loading, the engine gives ``lm_head`` its own copy of the embedding
(as engines that shard the output layer separately do), so the tied weight lives twice, the
copy is never refitted again and drifts from the embedding (NVIDIA-NeMo/labs-molt #26, vLLM
#51665, sglang #2009; shared/reference/refit.md, user pain points: tied embeddings)."""

from __future__ import annotations

import torch

from mx_reference.refit.receiver import RefitReceiver
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class TieLostReceiver(RefitReceiver):
    def apply(self, tensors):
        super().apply(tensors)
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is not None and head.weight is embed.weight:
            head.weight = torch.nn.Parameter(embed.weight.detach().clone())  # the bug


class TieLostAdapter(ReferenceAdapter):
    receiver_class = TieLostReceiver


def factory() -> TieLostAdapter:
    return TieLostAdapter(CpuMockBackend())
