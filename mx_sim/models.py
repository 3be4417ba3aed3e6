"""Tiny real HF ``transformers`` models: random init from small configs, no downloads.

The suite runs model code nobody here wrote: Llama-style GQA, Qwen2 (q/k/v biases, optional
tied embeddings), Mixtral MoE (transformers 5 stores experts fused and stacked) and GPT-2 (tied
embeddings, Conv1D weights). ``transformers`` is a test-only extra, imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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


def _hf_model(config_class: str, model_class: str, **config) -> torch.nn.Module:
    import transformers

    return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))


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
    "mixtral": lambda s: _hf_model(
        "MixtralConfig",
        "MixtralForCausalLM",
        **_decoder_config(s),
        num_local_experts=s.num_experts,
        num_experts_per_tok=2,
    ),
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
    return model.eval()


def fixed_prompt(vocab_size: int, length: int = 8) -> torch.Tensor:
    """The prompt every logits comparison uses: shape (1, length), deterministic token ids."""
    return (torch.arange(length, dtype=torch.long) * 7 + 3).remainder(vocab_size).unsqueeze(0)
