"""Megatron-Core <-> HF ``transformers`` name maps, one per model family.

A :class:`TensorRule` names one Megatron tensor, its TP role and the HF tensors it is made of,
plus the layout facts translation needs (``transpose`` for GPT-2's Conv1D weights, ``expert``
for a slice of HF's stacked experts). The shape-free rules live here; the tensor transforms that
follow them are in :mod:`mx_reference.refit.layouts`.

Families:

* ``llama``: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mixtral and Qwen3-MoE
  (transformers 5 stores experts fused and stacked). Megatron's fused layer norms carry weights
  only (RMSNorm), fc1 is gated ``[gate; up]``.
* ``gpt2``: learned position embeddings, LayerNorm weights *and* biases, a fused HF ``c_attn``
  (q|k|v along its output), biases on every linear, a plain (not gated) fc1, and Conv1D
  weights stored ``[in, out]`` where Megatron stores ``[out, in]``.

A tied ``lm_head`` is never a rule: the embedding is sent once and the tie restored on load.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import NamedTuple

EXPERT_LAYOUTS = ("per_expert", "grouped")
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
FAMILIES = ("llama", "gpt2")
LM_HEAD = "lm_head.weight"
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class RefitModelConfig:
    """The shape facts translation needs; ``from_hf`` reads them off a transformers config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 0
    qkv_bias: bool = False
    qk_norm: bool = False
    vocab_divisible_by: int = 128
    family: str = "llama"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"RefitModelConfig.family {self.family!r} not in {FAMILIES}")

    @classmethod
    def from_hf(cls, config) -> RefitModelConfig:
        """Llama-style (``LLAMA_STYLE`` model types) and GPT-2 configs; any other
        ``model_type`` raises ``ValueError`` naming it."""
        model_type = getattr(config, "model_type", "")
        if model_type == "gpt2":
            return cls(
                num_layers=config.n_layer,
                hidden_size=config.n_embd,
                num_heads=config.n_head,
                num_kv_heads=config.n_head,  # MHA
                head_dim=config.n_embd // config.n_head,
                intermediate_size=config.n_inner or 4 * config.n_embd,
                vocab_size=config.vocab_size,
                tie_word_embeddings=bool(config.tie_word_embeddings),
                qkv_bias=True,
                family="gpt2",
            )
        if model_type not in LLAMA_STYLE:
            raise ValueError(
                f"model_type {model_type!r}: no Megatron name map "
                f"(supported: {', '.join(LLAMA_STYLE)}, gpt2)"
            )
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads,
            intermediate_size=getattr(config, "moe_intermediate_size", None)
            or config.intermediate_size,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            num_experts=getattr(config, "num_local_experts", None)
            or getattr(config, "num_experts", None)
            or 0,
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=model_type.startswith("qwen3"),
        )

    def key(self) -> tuple:
        """Hashable identity for plan caches."""
        return astuple(self)


class TensorRule(NamedTuple):
    """One Megatron tensor and the HF tensors it comes from.

    A ``qkv_column`` rule names either HF's separate ``(q, k, v)`` or one fused ``q|k|v``
    tensor (GPT-2's ``c_attn``), which translation splits by head counts. ``transpose``: the HF
    weight is stored ``[in, out]`` (GPT-2's Conv1D), Megatron's is ``[out, in]``. ``expert`` is
    set for per-expert tensors cut from HF's stacked ``mlp.experts.*`` (transformers 5 stores
    ``gate_up_proj`` as (E, 2I, H) with gate rows first, ``down_proj`` as (E, H, I)).
    """

    megatron: str
    role: str
    hf: tuple[str, ...]
    axis: int = 0
    expert: int | None = None
    transpose: bool = False


def _llama_rules(cfg: RefitModelConfig, expert_layout: str) -> list[TensorRule]:
    R = TensorRule
    rules = [R(WORD_EMBEDDINGS, "vocab_parallel", ("model.embed_tokens.weight",))]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        att, qkv = m + "self_attention.", ("q_proj", "k_proj", "v_proj")
        rules += [
            R(att + "linear_qkv.layer_norm_weight", "replicated", (h + "input_layernorm.weight",)),
            R(
                att + "linear_qkv.weight",
                "qkv_column",
                tuple(f"{h}self_attn.{p}.weight" for p in qkv),
            ),
        ]
        if cfg.qkv_bias:
            rules.append(
                R(
                    att + "linear_qkv.bias",
                    "qkv_column",
                    tuple(f"{h}self_attn.{p}.bias" for p in qkv),
                )
            )
        if cfg.qk_norm:
            rules += [
                R(att + "q_layernorm.weight", "replicated", (h + "self_attn.q_norm.weight",)),
                R(att + "k_layernorm.weight", "replicated", (h + "self_attn.k_norm.weight",)),
            ]
        rules.append(R(att + "linear_proj.weight", "row", (h + "self_attn.o_proj.weight",), axis=1))
        if not cfg.num_experts:
            rules += [
                R(
                    m + "mlp.linear_fc1.layer_norm_weight",
                    "replicated",
                    (h + "post_attention_layernorm.weight",),
                ),
                R(
                    m + "mlp.linear_fc1.weight",
                    "gated_mlp_column",
                    (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                ),
                R(m + "mlp.linear_fc2.weight", "row", (h + "mlp.down_proj.weight",), axis=1),
            ]
            continue
        fc1, fc2 = (h + "mlp.experts.gate_up_proj",), (h + "mlp.experts.down_proj",)
        rules += [
            R(
                m + "pre_mlp_layernorm.weight",
                "replicated",
                (h + "post_attention_layernorm.weight",),
            ),
            R(m + "mlp.router.weight", "replicated", (h + "mlp.gate.weight",)),
        ]
        if expert_layout == "grouped":
            rules += [
                R(m + "mlp.experts.linear_fc1.weight", "expert_column", fc1, axis=1),
                R(m + "mlp.experts.linear_fc2.weight", "expert_row", fc2, axis=2),
            ]
            continue
        for e in range(cfg.num_experts):
            x = f"{m}mlp.experts.local_experts.{e}."
            rules += [
                R(x + "linear_fc1.weight", "expert_column", fc1, expert=e),
                R(x + "linear_fc2.weight", "expert_row", fc2, axis=1, expert=e),
            ]
    rules.append(R("decoder.final_layernorm.weight", "replicated", ("model.norm.weight",)))
    return rules


# (Megatron suffix, role, HF suffix, shard axis, HF stores it [in, out]) per GPT-2 block.
# Row-parallel biases are added after the reduction, so Megatron replicates them.
_GPT2_LAYER = (
    ("self_attention.linear_qkv.layer_norm_weight", "replicated", "ln_1.weight", 0, False),
    ("self_attention.linear_qkv.layer_norm_bias", "replicated", "ln_1.bias", 0, False),
    ("self_attention.linear_qkv.weight", "qkv_column", "attn.c_attn.weight", 0, True),
    ("self_attention.linear_qkv.bias", "qkv_column", "attn.c_attn.bias", 0, False),
    ("self_attention.linear_proj.weight", "row", "attn.c_proj.weight", 1, True),
    ("self_attention.linear_proj.bias", "replicated", "attn.c_proj.bias", 0, False),
    ("mlp.linear_fc1.layer_norm_weight", "replicated", "ln_2.weight", 0, False),
    ("mlp.linear_fc1.layer_norm_bias", "replicated", "ln_2.bias", 0, False),
    ("mlp.linear_fc1.weight", "column", "mlp.c_fc.weight", 0, True),
    ("mlp.linear_fc1.bias", "column", "mlp.c_fc.bias", 0, False),
    ("mlp.linear_fc2.weight", "row", "mlp.c_proj.weight", 1, True),
    ("mlp.linear_fc2.bias", "replicated", "mlp.c_proj.bias", 0, False),
)


def _gpt2_rules(cfg: RefitModelConfig, expert_layout: str) -> list[TensorRule]:
    R = TensorRule
    rules = [
        R(WORD_EMBEDDINGS, "vocab_parallel", ("transformer.wte.weight",)),
        R("embedding.position_embeddings.weight", "replicated", ("transformer.wpe.weight",)),
    ]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        rules += [
            R(m + meg, role, (h + hf,), axis, transpose=t) for meg, role, hf, axis, t in _GPT2_LAYER
        ]
    return rules + [
        R("decoder.final_layernorm.weight", "replicated", ("transformer.ln_f.weight",)),
        R("decoder.final_layernorm.bias", "replicated", ("transformer.ln_f.bias",)),
    ]


_FAMILY_RULES = {"llama": _llama_rules, "gpt2": _gpt2_rules}


def tensor_rules(cfg: RefitModelConfig, expert_layout: str = "per_expert") -> list[TensorRule]:
    """Megatron <-> HF name map of ``cfg.family`` (dense or MoE), in publishing order."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout {expert_layout!r} not in {EXPERT_LAYOUTS}")
    rules = _FAMILY_RULES[cfg.family](cfg, expert_layout)
    if not cfg.tie_word_embeddings:  # tied: the embedding is sent once, the tie restored on load
        rules.append(TensorRule("output_layer.weight", "vocab_parallel", (LM_HEAD,)))
    return rules


def megatron_name_map(
    cfg: RefitModelConfig, expert_layout: str = "per_expert"
) -> dict[str, tuple[str, ...]]:
    """Megatron name -> the HF names it is made of."""
    return {r.megatron: r.hf for r in tensor_rules(cfg, expert_layout)}
