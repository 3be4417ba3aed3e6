"""What scenarios, conformance checks, benchmarks and tests share: tiny real HF models and the
trainer's weights at each version (the oracle every refit is checked against).

The models are built from small configs with random init, no downloads, so the suite runs
model code nobody here wrote: Llama-style GQA, Qwen2 (q/k/v biases, optional tied embeddings),
Qwen3 (q/k norms),
Mixtral MoE (transformers 5 stores experts fused and stacked), Phi-3 (fused q|k|v and gate|up),
OLMo2 (post-norms, q/k norms), Gemma, Gemma 2 and Gemma 3 (norms before and after each block)
and GPT-2 (tied embeddings, Conv1D weights). ``transformers`` is a test-only extra, imported lazily.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mx_reference.refit.apply import model_parameters
from mx_reference.refit.layouts import megatron_shards_from_hf
from mx_reference.refit.name_maps import RefitModelConfig
from mx_reference.refit.wire import DTYPES, ShardDescriptor


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape knobs shared by the tiny configs; defaults keep every model under 1 MB."""

    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 4
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # or "bfloat16": parameters, publisher shards and receivers alike


# a replica's ranks build their models in threads at once: a thread importing transformers
# while another one is can see the package before it has become its lazy module
_IMPORT_LOCK = threading.Lock()


def _hf_model(config_class: str, model_class: str, **config) -> torch.nn.Module:
    with _IMPORT_LOCK:
        import transformers

        model, config_type = getattr(transformers, model_class), getattr(transformers, config_class)
    return model(config_type(**config))


def _decoder_config(spec: TinyModelSpec) -> dict:
    """The fields Llama-style decoders (Llama, Qwen2, Mixtral) share."""
    return dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        tie_word_embeddings=spec.tie_word_embeddings,
    )


_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)  # inside the tiny vocab


def _gemma_config(spec: TinyModelSpec) -> dict:
    return dict(**_decoder_config(spec), **_IDS, head_dim=spec.hidden_size // spec.num_heads)


def _gpt2(spec: TinyModelSpec) -> torch.nn.Module:
    return _hf_model(
        "GPT2Config",
        "GPT2LMHeadModel",
        vocab_size=spec.vocab_size,
        n_embd=spec.hidden_size,
        n_layer=spec.num_layers,
        n_head=spec.num_heads,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )


MODEL_BUILDERS: dict[str, Callable[[TinyModelSpec], torch.nn.Module]] = {
    "llama": lambda s: _hf_model("LlamaConfig", "LlamaForCausalLM", **_decoder_config(s)),
    "qwen2": lambda s: _hf_model("Qwen2Config", "Qwen2ForCausalLM", **_decoder_config(s)),
    "qwen3": lambda s: _hf_model(
        "Qwen3Config",
        "Qwen3ForCausalLM",
        **_decoder_config(s),
        head_dim=s.hidden_size // s.num_heads,
    ),
    "mixtral": lambda s: _hf_model(
        "MixtralConfig",
        "MixtralForCausalLM",
        **_decoder_config(s),
        num_local_experts=s.num_experts,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": lambda s: _hf_model(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        **_decoder_config(s),
        **_IDS,
        num_experts=s.num_experts,
        num_experts_per_tok=2,
        moe_intermediate_size=s.intermediate_size // 2,
        shared_expert_intermediate_size=s.intermediate_size,
    ),
    # layer 0 dense (mlp_only_layers), layer 1 MoE
    "qwen3_moe": lambda s: _hf_model(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        **_decoder_config(s),
        **_IDS,
        head_dim=s.hidden_size // s.num_heads,
        num_experts=s.num_experts,
        num_experts_per_tok=2,
        moe_intermediate_size=s.intermediate_size // 2,
        mlp_only_layers=[0],
    ),
    # MLA, a dense first layer, then MoE layers with a shared expert
    "deepseek_v3": lambda s: _hf_model(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        **{**_decoder_config(s), "num_key_value_heads": s.num_heads},  # MLA: one kv per head
        **_IDS,
        n_routed_experts=s.num_experts,
        num_experts_per_tok=2,
        n_group=2,  # two groups of experts, the best one kept: group-limited routing
        topk_group=1,
        moe_intermediate_size=s.intermediate_size // 2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=s.hidden_size // 2,
        kv_lora_rank=s.hidden_size // 4,
        qk_rope_head_dim=8,
        qk_nope_head_dim=s.hidden_size // s.num_heads,
        v_head_dim=s.hidden_size // s.num_heads,
    ),
    "phi3": lambda s: _hf_model("Phi3Config", "Phi3ForCausalLM", **_decoder_config(s), **_IDS),
    "olmo2": lambda s: _hf_model("Olmo2Config", "Olmo2ForCausalLM", **_decoder_config(s), **_IDS),
    "gemma": lambda s: _hf_model("GemmaConfig", "GemmaForCausalLM", **_gemma_config(s)),
    "gemma2": lambda s: _hf_model("Gemma2Config", "Gemma2ForCausalLM", **_gemma_config(s)),
    "gemma3": lambda s: _hf_model("Gemma3TextConfig", "Gemma3ForCausalLM", **_gemma_config(s)),
    "gpt2": _gpt2,
}


def build_tiny_model(
    kind: str, spec: TinyModelSpec | None = None, *, seed: int = 0
) -> torch.nn.Module:
    """A tiny ``kind`` model in eval mode with deterministic random weights for ``seed``."""
    if kind not in MODEL_BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}; known: {', '.join(MODEL_BUILDERS)}")
    spec = spec or TinyModelSpec()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODEL_BUILDERS[kind](spec)
    return model.to(DTYPES[spec.dtype]).eval()


def fixed_prompt(vocab_size: int, length: int = 8) -> torch.Tensor:
    """The prompt every logits comparison uses: shape (1, length), deterministic token ids."""
    return (torch.arange(length, dtype=torch.long) * 7 + 3).remainder(vocab_size).unsqueeze(0)


# ---- the version oracle ------------------------------------------------------------------


def version_model(kind: str, spec: TinyModelSpec | None, version: int) -> torch.nn.Module:
    """A fresh model holding the trainer's weights at ``version``: its own seed, shifted so that
    no tensor (layer norms included) equals its value at any other version, nor at a fresh
    init (norms of ones, zero biases), which is version 1 of a Megatron trainer."""
    model = build_tiny_model(kind, spec, seed=version)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((version + 1) / 128)
    return model


@functools.lru_cache(maxsize=16)
def _cached_version_model(kind: str, spec: TinyModelSpec, version: int) -> torch.nn.Module:
    return version_model(kind, spec, version)


@dataclass(frozen=True)
class VersionWeights:
    """The trainer's weights at every version of one tiny model (read-only, cached)."""

    kind: str = "llama"
    spec: TinyModelSpec = TinyModelSpec()

    def model(self, version: int) -> torch.nn.Module:
        """The trainer's model at ``version``: shared, never to be written."""
        return _cached_version_model(self.kind, self.spec, version)

    def params(self, version: int) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in model_parameters(self.model(version)).items()}

    def state(self, version: int) -> dict[str, torch.Tensor]:
        return self.model(version).state_dict()

    atol = 0.0  # receivers of these weights must match them bit for bit

    def logits(self, version: int) -> torch.Tensor:
        """The trainer model's logits on the fixed prompt, (1, S, V)."""
        model = self.model(version)
        with torch.no_grad():
            return model(fixed_prompt(model.config.vocab_size)).logits

    @functools.cached_property
    def model_config(self) -> RefitModelConfig:
        return RefitModelConfig.from_hf(self.model(1).config)


def pp_stage(name: str, num_layers: int, pp_size: int) -> int:
    """The pipeline stage holding Megatron tensor ``name`` (even layer split)."""
    layer = re.match(r"decoder\.layers\.(\d+)\.", name)
    if layer:
        return int(layer.group(1)) * pp_size // num_layers
    return 0 if name.startswith("embedding.") else pp_size - 1


def rank_shards(
    state: dict[str, torch.Tensor],
    cfg: RefitModelConfig,
    *,
    tp: tuple[int, int],
    pp: tuple[int, int] = (0, 1),
    ep: tuple[int, int] = (0, 1),
) -> list[tuple[ShardDescriptor, torch.Tensor]]:
    """What the trainer rank at ``tp``, ``pp``, ``ep`` (each ``(rank, size)``) publishes: its
    TP/EP shards of its PP stage's tensors."""
    shards = megatron_shards_from_hf(
        state, cfg, tp_size=tp[1], tp_rank=tp[0], ep_size=ep[1], ep_rank=ep[0]
    )
    return [(d, t) for d, t in shards if pp_stage(d.name, cfg.num_layers, pp[1]) == pp[0]]
