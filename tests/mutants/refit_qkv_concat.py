"""QKV read as a plain concatenation ``[q; k; v]`` instead of Megatron's per-group interleave
``[q heads of g; k_g; v_g]``: wrong whenever there is more than one KV group, and training loss
still falls, so nothing looks broken (NVIDIA-NeMo/RL #2802, alibaba/ChatLearn #277; see
shared/reference/refit.md, user pain points: layout)."""

from __future__ import annotations

from mx_reference.refit.name_maps import megatron_name_map
from mx_reference.refit.receiver import RefitReceiver
from mx_sim.conformance.adapters import ReferenceAdapter
from mx_sim.cpu_mock import CpuMockBackend


class QkvConcatReceiver(RefitReceiver):
    def translate(self, canonical):
        out = super().translate(canonical)
        cfg = self.model_config
        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for megatron, hf in megatron_name_map(cfg).items():
            if ".linear_qkv." in megatron and not megatron.endswith("layer_norm_weight"):
                parts = canonical[megatron].split([q_rows, kv_rows, kv_rows])  # the bug
                out.update(zip(hf, parts, strict=True))
        return out


class QkvConcatAdapter(ReferenceAdapter):
    receiver_class = QkvConcatReceiver


def factory() -> QkvConcatAdapter:
    return QkvConcatAdapter(CpuMockBackend())
