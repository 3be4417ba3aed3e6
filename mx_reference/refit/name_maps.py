"""Megatron-Core <-> HF ``transformers`` name maps, one per model family.

Each family is one declarative :class:`FamilyTable`. A :class:`TensorRule` (one row expanded for
one layer) names one Megatron tensor, its TP style and the HF tensors it is made of,
plus the layout facts translation needs (``transpose`` for GPT-2's Conv1D weights, ``expert``
for a slice of HF's stacked experts). The shape-free rules live here; the tensor transforms that
follow them are in :mod:`mx_reference.refit.layouts`.

Families:

* ``llama``: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mixtral and Qwen3-MoE
  (transformers 5 stores experts fused and stacked). Megatron's fused layer norms carry weights
  only (RMSNorm), fc1 is gated ``[gate; up]``. The same table covers Phi-3 (HF stores ``q|k|v``
  and ``gate|up`` fused: one HF tensor per rule), OLMo2 (norms after attention and MLP instead
  of before, q/k norms over the whole projection), Gemma (Llama's names; its norm weights are
  stored as HF keeps them, scaled by ``1 + w`` in the forward) and Gemma 2/3 (a norm before
  *and* after each block; Gemma 3 adds q/k norms). The post-block norms have no Megatron-Core
  GPT-layer counterpart: they are named ``post_self_attn_layernorm`` / ``post_mlp_layernorm``.
  MoE models may keep dense layers (``dense_layers``) and shared experts (Qwen2-MoE with a
  gate, DeepSeek); DeepSeek-V3's MLA maps onto Megatron-Core's MLA names
  (``linear_q_down_proj``, ``linear_q_up_proj``, ``linear_kv_down_proj``, ``linear_kv_up_proj``).
* ``gpt2``: learned position embeddings, LayerNorm weights *and* biases, a fused HF ``c_attn``
  (q|k|v along its output), biases on every linear, a plain (not gated) fc1, and Conv1D
  weights stored ``[in, out]`` where Megatron stores ``[out, in]``.

A tied ``lm_head`` is never a rule: the embedding is sent once and the tie restored on load.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import NamedTuple

EXPERT_LAYOUTS = ("per_expert", "grouped")
LLAMA_STYLE = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
    "deepseek_v3",
    "phi3",
    "olmo2",
    "gemma",
    "gemma2",
    "gemma3_text",
)
NORMS = ("pre", "post", "sandwich")
# where a decoder layer's norms sit, by model type (the rest: "pre", Llama's)
_NORMS = {"olmo2": "post", "gemma2": "sandwich", "gemma3_text": "sandwich"}
_QK_NORM = ("qwen3", "qwen3_moe", "olmo2", "gemma3_text")
FAMILIES = ("llama", "gpt2")
LM_HEAD = "lm_head.weight"
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


def _dense_layers(config, num_experts: int) -> tuple[int, ...]:
    """Layers of an MoE model whose MLP is dense: DeepSeek's first ``first_k_dense_replace``,
    Qwen-MoE's ``mlp_only_layers`` and those ``decoder_sparse_step`` skips."""
    if not num_experts:
        return ()
    layers = range(config.num_hidden_layers)
    first = getattr(config, "first_k_dense_replace", None) or 0
    only = set(getattr(config, "mlp_only_layers", None) or ())
    step = getattr(config, "decoder_sparse_step", None) or 1
    return tuple(i for i in layers if i < first or i in only or (i + 1) % step)


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
    proj_bias: bool = False  # o_proj bias (Llama / Qwen3 attention_bias)
    mlp_bias: bool = False  # gate, up and down biases (Llama mlp_bias)
    qk_norm: bool = False
    norms: str = "pre"  # one of NORMS: before each block, after it, or both (sandwich)
    fused: bool = False  # HF stores q|k|v and gate|up each as one tensor (Phi-3)
    dense_layers: tuple[int, ...] = ()  # dense-MLP layers of an MoE model
    shared_experts: str = ""  # HF module of the always-on experts ("shared_expert(s)")
    shared_gate: bool = False  # a sigmoid gate on the shared expert (Qwen2-MoE)
    mla: bool = False  # multi-head latent attention (DeepSeek-V2/V3)
    q_lora: bool = False  # MLA queries through a low-rank q_a/q_b pair
    vocab_divisible_by: int = 128
    family: str = "llama"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"RefitModelConfig.family {self.family!r} not in {FAMILIES}")
        if self.norms not in NORMS:
            raise ValueError(f"RefitModelConfig.norms {self.norms!r} not in {NORMS}")

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
        num_experts = (
            getattr(config, "num_local_experts", None)
            or getattr(config, "num_experts", None)
            or getattr(config, "n_routed_experts", None)
            or 0
        )
        attention_bias = bool(getattr(config, "attention_bias", False))
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
            num_experts=num_experts,
            qkv_bias=model_type in ("qwen2", "qwen2_moe") or attention_bias,
            proj_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type in _QK_NORM,
            norms=_NORMS.get(model_type, "pre"),
            fused=model_type == "phi3",
            dense_layers=_dense_layers(config, num_experts),
            shared_experts={"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}.get(
                model_type, ""
            ),
            shared_gate=model_type == "qwen2_moe",
            mla=model_type == "deepseek_v3",
            q_lora=bool(getattr(config, "q_lora_rank", None)),
        )

    def moe_layer(self, i: int) -> bool:
        return bool(self.num_experts) and i not in self.dense_layers

    def key(self) -> tuple:
        """Hashable identity for plan caches."""
        return astuple(self)


class TensorRule(NamedTuple):
    """One Megatron tensor and the HF tensors it comes from.

    ``style`` is its tensor-parallel style (:data:`mx_reference.refit.wire.STYLES`). A
    ``qkv_column`` rule names either HF's separate ``(q, k, v)`` or one fused ``q|k|v`` tensor
    (GPT-2's ``c_attn``), which translation splits by head counts. ``transpose``: the HF weight
    is stored ``[in, out]`` (GPT-2's Conv1D), Megatron's is ``[out, in]``. ``expert`` is set for
    per-expert tensors cut from HF's stacked ``mlp.experts.*`` (transformers 5 stores
    ``gate_up_proj`` as (E, 2I, H) with gate rows first, ``down_proj`` as (E, H, I)).
    """

    megatron: str
    style: str
    hf: tuple[str, ...]
    axis: int = 0
    expert: int | None = None
    transpose: bool = False


class LayerEntry(NamedTuple):
    """One row of a family's per-layer table: Megatron suffix, TP style, HF suffixes, shard
    axis, whether HF stores it transposed, and when the row applies (:data:`_WHEN`). In an
    ``experts`` row, ``{e}`` in the Megatron suffix is the expert id."""

    megatron: str
    style: str
    hf: tuple[str, ...]
    axis: int = 0
    transpose: bool = False
    when: str = "always"


# Which rows of a table a model has: read off its RefitModelConfig and the expert layout.
_WHEN = {
    "always": lambda cfg, layout, i: True,
    "qkv_bias": lambda cfg, layout, i: cfg.qkv_bias,
    "proj_bias": lambda cfg, layout, i: cfg.proj_bias,
    "mlp_bias": lambda cfg, layout, i: cfg.mlp_bias and not cfg.moe_layer(i),
    "qk_norm": lambda cfg, layout, i: cfg.qk_norm,
    "pre_attn_norm": lambda cfg, layout, i: cfg.norms != "post" and not cfg.mla,
    "mla": lambda cfg, layout, i: cfg.mla,
    "mla_q_lora": lambda cfg, layout, i: cfg.mla and cfg.q_lora,
    "mla_q": lambda cfg, layout, i: cfg.mla and not cfg.q_lora,
    "post_norms": lambda cfg, layout, i: cfg.norms != "pre",
    "pre_mlp_norm": lambda cfg, layout, i: cfg.norms == "pre" and not cfg.moe_layer(i),
    "sandwich": lambda cfg, layout, i: cfg.norms == "sandwich",
    "split": lambda cfg, layout, i: not cfg.fused and not cfg.mla,
    "fused": lambda cfg, layout, i: cfg.fused,
    "dense_split": lambda cfg, layout, i: not cfg.moe_layer(i) and not cfg.fused,
    "dense_fused": lambda cfg, layout, i: not cfg.moe_layer(i) and cfg.fused,
    "dense": lambda cfg, layout, i: not cfg.moe_layer(i),
    "moe": lambda cfg, layout, i: cfg.moe_layer(i),
    "shared": lambda cfg, layout, i: cfg.moe_layer(i) and bool(cfg.shared_experts),
    "shared_gate": lambda cfg, layout, i: cfg.moe_layer(i) and cfg.shared_gate,
    "grouped": lambda cfg, layout, i: cfg.moe_layer(i) and layout == "grouped",
    "experts": lambda cfg, layout, i: cfg.moe_layer(i) and layout == "per_expert",
}

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_E = LayerEntry
_LLAMA_LAYER = (
    _E("self_attention.linear_qkv.layer_norm_weight", "replicated", ("input_layernorm.weight",), when="pre_attn_norm"),
    _E("self_attention.linear_qkv.weight", "qkv_column", tuple(f"{p}.weight" for p in _QKV), when="split"),
    _E("self_attention.linear_qkv.weight", "qkv_column", ("self_attn.qkv_proj.weight",), when="fused"),
    _E("self_attention.linear_qkv.bias", "qkv_column", tuple(f"{p}.bias" for p in _QKV), when="qkv_bias"),
    _E("self_attention.q_layernorm.weight", "replicated", ("self_attn.q_norm.weight",), when="qk_norm"),
    _E("self_attention.k_layernorm.weight", "replicated", ("self_attn.k_norm.weight",), when="qk_norm"),
    # MLA (DeepSeek): low-rank q and kv projections, their norms fused into the up-projections;
    # the down-projections are column-parallel (the local spec's ColumnParallelLinear, its
    # output all-gathered), kv's rows [kv_lora_rank latent; qk_rope_head_dim rope] cut as one
    _E("input_layernorm.weight", "replicated", ("input_layernorm.weight",), when="mla"),
    _E("self_attention.linear_q_down_proj.weight", "column", ("self_attn.q_a_proj.weight",), when="mla_q_lora"),
    _E("self_attention.linear_q_up_proj.layer_norm_weight", "replicated", ("self_attn.q_a_layernorm.weight",), when="mla_q_lora"),
    _E("self_attention.linear_q_up_proj.weight", "column", ("self_attn.q_b_proj.weight",), when="mla_q_lora"),
    _E("self_attention.linear_q_proj.weight", "column", ("self_attn.q_proj.weight",), when="mla_q"),
    _E("self_attention.linear_kv_down_proj.weight", "column", ("self_attn.kv_a_proj_with_mqa.weight",), when="mla"),
    _E("self_attention.linear_kv_up_proj.layer_norm_weight", "replicated", ("self_attn.kv_a_layernorm.weight",), when="mla"),
    _E("self_attention.linear_kv_up_proj.weight", "column", ("self_attn.kv_b_proj.weight",), when="mla"),
    _E("self_attention.linear_proj.weight", "row", ("self_attn.o_proj.weight",), axis=1),
    # row-parallel biases are added after the reduction: Megatron replicates them
    _E("self_attention.linear_proj.bias", "replicated", ("self_attn.o_proj.bias",), when="proj_bias"),
    _E("post_self_attn_layernorm.weight", "replicated", ("post_attention_layernorm.weight",), when="post_norms"),
    _E("mlp.linear_fc1.layer_norm_weight", "replicated", ("post_attention_layernorm.weight",), when="pre_mlp_norm"),
    _E("mlp.linear_fc1.layer_norm_weight", "replicated", ("pre_feedforward_layernorm.weight",), when="sandwich"),
    _E("mlp.linear_fc1.weight", "gated_mlp_column", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), when="dense_split"),
    _E("mlp.linear_fc1.weight", "gated_mlp_column", ("mlp.gate_up_proj.weight",), when="dense_fused"),
    _E("mlp.linear_fc2.weight", "row", ("mlp.down_proj.weight",), axis=1, when="dense"),
    _E("post_mlp_layernorm.weight", "replicated", ("post_feedforward_layernorm.weight",), when="post_norms"),
    _E("mlp.linear_fc1.bias", "gated_mlp_column", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), when="mlp_bias"),
    _E("mlp.linear_fc2.bias", "replicated", ("mlp.down_proj.bias",), when="mlp_bias"),
    _E("pre_mlp_layernorm.weight", "replicated", ("post_attention_layernorm.weight",), when="moe"),
    _E("mlp.router.weight", "replicated", ("mlp.gate.weight",), when="moe"),
    _E("mlp.experts.linear_fc1.weight", "expert_column", ("mlp.experts.gate_up_proj",), axis=1, when="grouped"),
    _E("mlp.experts.linear_fc2.weight", "expert_row", ("mlp.experts.down_proj",), axis=2, when="grouped"),
    _E("mlp.experts.local_experts.{e}.linear_fc1.weight", "expert_column", ("mlp.experts.gate_up_proj",), when="experts"),
    _E("mlp.experts.local_experts.{e}.linear_fc2.weight", "expert_row", ("mlp.experts.down_proj",), axis=1, when="experts"),
    # always-on experts beside the routed ones ({s}: the HF module, shared_expert(s))
    _E("mlp.shared_experts.linear_fc1.weight", "gated_mlp_column", ("mlp.{s}.gate_proj.weight", "mlp.{s}.up_proj.weight"), when="shared"),
    _E("mlp.shared_experts.linear_fc2.weight", "row", ("mlp.{s}.down_proj.weight",), axis=1, when="shared"),
    _E("mlp.shared_experts.gate_weight", "replicated", ("mlp.shared_expert_gate.weight",), when="shared_gate"),
)  # fmt: skip

# Row-parallel biases are added after the reduction, so Megatron replicates them.
_GPT2_LAYER = (
    _E("self_attention.linear_qkv.layer_norm_weight", "replicated", ("ln_1.weight",)),
    _E("self_attention.linear_qkv.layer_norm_bias", "replicated", ("ln_1.bias",)),
    _E("self_attention.linear_qkv.weight", "qkv_column", ("attn.c_attn.weight",), transpose=True),
    _E("self_attention.linear_qkv.bias", "qkv_column", ("attn.c_attn.bias",)),
    _E("self_attention.linear_proj.weight", "row", ("attn.c_proj.weight",), axis=1, transpose=True),
    _E("self_attention.linear_proj.bias", "replicated", ("attn.c_proj.bias",)),
    _E("mlp.linear_fc1.layer_norm_weight", "replicated", ("ln_2.weight",)),
    _E("mlp.linear_fc1.layer_norm_bias", "replicated", ("ln_2.bias",)),
    _E("mlp.linear_fc1.weight", "column", ("mlp.c_fc.weight",), transpose=True),
    _E("mlp.linear_fc1.bias", "column", ("mlp.c_fc.bias",)),
    _E("mlp.linear_fc2.weight", "row", ("mlp.c_proj.weight",), axis=1, transpose=True),
    _E("mlp.linear_fc2.bias", "replicated", ("mlp.c_proj.bias",)),
)  # fmt: skip


@dataclass(frozen=True)
class FamilyTable:
    """A family's whole name map: HF layer prefix, the tensors before and after the layers
    (``(Megatron name, style, HF name)``), and the per-layer rows."""

    hf_layer: str
    head: tuple[tuple[str, str, str], ...]
    layer: tuple[LayerEntry, ...]
    tail: tuple[tuple[str, str, str], ...]


_TABLES = {
    "llama": FamilyTable(
        hf_layer="model.layers.{i}.",
        head=((WORD_EMBEDDINGS, "vocab_parallel", "model.embed_tokens.weight"),),
        layer=_LLAMA_LAYER,
        tail=(("decoder.final_layernorm.weight", "replicated", "model.norm.weight"),),
    ),
    "gpt2": FamilyTable(
        hf_layer="transformer.h.{i}.",
        head=(
            (WORD_EMBEDDINGS, "vocab_parallel", "transformer.wte.weight"),
            ("embedding.position_embeddings.weight", "replicated", "transformer.wpe.weight"),
        ),
        layer=_GPT2_LAYER,
        tail=(
            ("decoder.final_layernorm.weight", "replicated", "transformer.ln_f.weight"),
            ("decoder.final_layernorm.bias", "replicated", "transformer.ln_f.bias"),
        ),
    ),
}


def _layer_rules(table: FamilyTable, cfg: RefitModelConfig, expert_layout: str, i: int):
    m, h = f"decoder.layers.{i}.", table.hf_layer.format(i=i)
    for row in table.layer:
        if not _WHEN[row.when](cfg, expert_layout, i):
            continue
        hf = tuple(h + n.format(s=cfg.shared_experts) for n in row.hf)
        if row.when != "experts":
            yield TensorRule(m + row.megatron, row.style, hf, row.axis, None, row.transpose)
            continue
        for e in range(cfg.num_experts):
            name = m + row.megatron.format(e=e)
            yield TensorRule(name, row.style, hf, row.axis, e, row.transpose)


def tensor_rules(cfg: RefitModelConfig, expert_layout: str = "per_expert") -> list[TensorRule]:
    """Megatron <-> HF name map of ``cfg.family`` (dense or MoE), in publishing order."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout {expert_layout!r} not in {EXPERT_LAYOUTS}")
    table = _TABLES[cfg.family]
    rules = [TensorRule(m, style, (hf,)) for m, style, hf in table.head]
    for i in range(cfg.num_layers):
        rules += _layer_rules(table, cfg, expert_layout, i)
    rules += [TensorRule(m, style, (hf,)) for m, style, hf in table.tail]
    if not cfg.tie_word_embeddings:  # tied: the embedding is sent once, the tie restored on load
        rules.append(TensorRule("output_layer.weight", "vocab_parallel", (LM_HEAD,)))
    return rules


def megatron_name_map(
    cfg: RefitModelConfig, expert_layout: str = "per_expert"
) -> dict[str, tuple[str, ...]]:
    """Megatron name -> the HF names it is made of."""
    return {r.megatron: r.hf for r in tensor_rules(cfg, expert_layout)}
