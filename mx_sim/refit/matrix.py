"""The CI refit matrix: the topologies ``mx-sim run`` and ``tests/refit`` both run, 3 cycles
each, and the fault topology. A row whose replica is tensor-parallel runs sharded HF TP ranks
(:func:`~mx_sim.refit.multiprocess.default_engine`)."""

from __future__ import annotations

from dataclasses import dataclass

from mx_sim.cluster.topology import TopologySpec
from mx_sim.fixtures import TinyModelSpec


@dataclass(frozen=True)
class MatrixRow:
    """One refit scenario: a topology, the tiny model it refits, and whether replica 0
    republishes for the others (a fan-out tree)."""

    spec: TopologySpec
    kind: str = "llama"
    model_spec: TinyModelSpec | None = None
    fanout: bool = False


MATRIX: dict[str, MatrixRow] = {
    "refit TP1->TP1": MatrixRow(TopologySpec()),
    "refit TP2->TP1": MatrixRow(TopologySpec(trainer_tp=2)),
    "refit TP1->TP2": MatrixRow(TopologySpec(inference_tp=2), "qwen2"),
    "refit TP2->TP4 GQA": MatrixRow(TopologySpec(trainer_tp=2, inference_tp=4)),
    "refit PP2xTP2->TP4": MatrixRow(TopologySpec(trainer_tp=2, trainer_pp=2, inference_tp=4)),
    "refit EP2->EP1 MoE": MatrixRow(TopologySpec(trainer_ep=2), "mixtral"),
    # rows with a tensor-parallel replica run sharded HF TP ranks (default_engine): each rank
    # pulls and writes only its own slices; T > G repeats KV heads as vLLM does
    "refit TP4->TP2 sharded": MatrixRow(
        TopologySpec(trainer_tp=4, inference_tp=2), model_spec=TinyModelSpec(num_kv_heads=4)
    ),
    "refit TP2->TP4 sharded G=4": MatrixRow(
        TopologySpec(trainer_tp=2, inference_tp=4), model_spec=TinyModelSpec(num_kv_heads=4)
    ),
    "refit TP1->TP2 sharded G=1": MatrixRow(
        TopologySpec(inference_tp=2), model_spec=TinyModelSpec(num_kv_heads=1)
    ),
    "refit EP2->TP2 MoE sharded": MatrixRow(TopologySpec(trainer_ep=2, inference_tp=2), "mixtral"),
    # GPT-2 ties lm_head to wte; vocab 200 pads to 256 at TP2, so both trainer ranks hold real
    # embedding rows and the receiver merges the tied tensor from two shards
    "refit tied embeddings": MatrixRow(
        TopologySpec(trainer_tp=2), "gpt2", TinyModelSpec(vocab_size=200)
    ),
    "refit tied Llama TP2->TP1": MatrixRow(
        TopologySpec(trainer_tp=2), model_spec=TinyModelSpec(tie_word_embeddings=True)
    ),
    # Qwen3's q/k norms are replicated over TP but see only each rank's heads: their gradients
    # must be summed over TP (Megatron's finalize_model_grads), or the ranks' copies drift
    "refit Qwen3 q/k-norm TP2->TP2": MatrixRow(TopologySpec(trainer_tp=2, inference_tp=2), "qwen3"),
    "refit fan-out 1->1->2": MatrixRow(TopologySpec(replicas=3), fanout=True),
    # one row per further family (Megatron-Core trains Phi-3, DeepSeek-V3 and the MoE families
    # here; the others use the HF-split trainer: docs/simulator.md lists the blockers)
    "refit Phi-3 fused TP2->TP2": MatrixRow(TopologySpec(trainer_tp=2, inference_tp=2), "phi3"),
    "refit OLMo2 post-norms TP4->TP2": MatrixRow(
        TopologySpec(trainer_tp=4, inference_tp=2), "olmo2", TinyModelSpec(num_kv_heads=4)
    ),
    "refit Gemma TP2->TP1": MatrixRow(TopologySpec(trainer_tp=2), "gemma"),
    "refit Gemma2 sandwich TP1->TP2": MatrixRow(TopologySpec(inference_tp=2), "gemma2"),
    "refit Gemma3 q/k-norm TP2->TP4": MatrixRow(
        TopologySpec(trainer_tp=2, inference_tp=4), "gemma3"
    ),
    "refit DeepSeek-V3 MLA TP2->TP2": MatrixRow(
        TopologySpec(trainer_tp=2, inference_tp=2), "deepseek_v3"
    ),
    "refit Qwen2-MoE shared expert TP1->TP2": MatrixRow(TopologySpec(inference_tp=2), "qwen2_moe"),
    "refit Qwen3-MoE mixed dense EP2->TP1": MatrixRow(TopologySpec(trainer_ep=2), "qwen3_moe"),
    # Megatron MoE at EP2 x TP2: the router's TP copies are averaged each step, or they drift
    "refit EP2xTP2->TP2 Mixtral": MatrixRow(
        TopologySpec(trainer_tp=2, trainer_ep=2, inference_tp=2), "mixtral"
    ),
}
QUICK = ("refit TP2->TP1", "refit TP2->TP4 GQA", "refit EP2->EP1 MoE")

# Faults run on TP2->TP2: trainers are global ranks 0 and 1, receivers 2 and 3 (TP ranks 0, 1),
# full-model receivers unless asked (their seconds-long timeouts leave no room for a TP load).
FAULT_TOPOLOGY = TopologySpec(trainer_tp=2, inference_tp=2)
