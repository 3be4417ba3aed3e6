"""A real Megatron-Core trainer rank on CPU: its own init, its own optimizer steps, its own
forward as the oracle.

Each trainer process builds one stage of a Megatron ``GPTModel`` (the local layer spec) for a
tiny model family, under Megatron's own ``parallel_state`` for TP x PP over gloo. Version 1 is
Megatron's seeded init; each later version is one SGD step of a real forward and backward on a
fixed batch, so consecutive versions differ in every tensor the way real refits do. What a rank
publishes is its own parameters (:func:`mx_reference.refit.megatron.shards_from_megatron`), and
what receivers are checked against is Megatron's own logits on the fixed prompt, all-gathered
over TP (``parallel_output=False``).

What running on CPU takes (``shared/reference/engines.md`` has the measurements):

* one process-wide patch, ``torch.cuda.current_device = lambda: cpu``, set only in simulator
  trainer processes (Megatron's rotary embedding and attention buffers ask for a CUDA device);
* ``initialize_rng_tracker(inference_rng_tracker=True)`` instead of the CUDA seeding, hence
  dropout 0; fusions off; ``use_cpu_initialization``; an explicit causal mask;
* the pipeline schedule by hand: Megatron's schedules allocate on ``cuda`` unconditionally
  (``pipeline_parallel/schedules.py``), so one micro-batch goes forward stage by stage through
  ``GPTModel.set_input_tensor`` and back, over gloo ``send``/``recv``.

Families: ``llama`` (RMSNorm, SwiGLU, RoPE, GQA; tied or not), ``qwen2`` (q/k/v biases),
``qwen3`` (q/k RMSNorm per head), ``phi3`` (Llama's blocks; HF fuses q|k|v and gate|up,
which only the receivers' name map sees), ``gpt2`` (LayerNorm, tanh-GELU, learned positions,
biases, tied), the MoE families ``mixtral``, ``qwen2_moe`` (a gated shared expert) and
``qwen3_moe`` (a dense first layer), and ``deepseek_v3`` (``MLATransformerConfig``: MLA with
plain RoPE, a sigmoid router with group-limited top k and scaled weights, a shared expert, a
dense first layer), at TP, EP and PP; docs/simulator.md lists why the other families are not
run through Megatron here.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
from dataclasses import dataclass

import msgspec
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mx_reference.refit.layouts import padded_vocab_size
from mx_reference.refit.megatron import shards_from_megatron
from mx_reference.refit.name_maps import RefitModelConfig
from mx_sim.cluster.topology import RankInfo
from mx_sim.fixtures import TinyModelSpec, build_tiny_model, fixed_prompt

FAMILIES = (
    "llama",
    "qwen2",
    "qwen3",
    "phi3",
    "gpt2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
)
LEARNING_RATE = 0.05
GPT2_POSITIONS = 64  # mx_sim.fixtures builds GPT-2 with n_positions=64


def megatron_available() -> bool:
    return importlib.util.find_spec("megatron.core") is not None


@dataclass(frozen=True)
class MegatronModelSpec:
    """The Megatron side of a tiny HF family: what ``TransformerConfig`` and ``GPTModel`` take."""

    kind: str
    spec: TinyModelSpec

    def __post_init__(self) -> None:
        if self.kind not in FAMILIES:
            raise ValueError(
                f"model {self.kind!r} does not run through Megatron-Core here; "
                f"Megatron trainers take {', '.join(FAMILIES)} (use --trainer hf-split)"
            )

    @property
    def gpt2(self) -> bool:
        return self.kind == "gpt2"

    @property
    def tied(self) -> bool:
        return self.gpt2 or self.spec.tie_word_embeddings

    @functools.cached_property
    def hf_config(self):
        """The config of the HF model the receivers hold."""
        return build_tiny_model(self.kind, self.spec).config

    def refit_config(self) -> RefitModelConfig:
        """The receivers' view."""
        return RefitModelConfig.from_hf(self.hf_config)

    def check(self, tp: int, pp: int, ep: int = 1) -> None:
        """Refuse, before any rank starts, what Megatron-Core refuses: first a DeepSeek-V3
        config it would compute otherwise than HF, then its own config validation (its
        message), then what it would only fail on while building the model (query groups and
        MLA's down-projection rows per TP rank, layers per stage)."""
        layout = f"TP{tp} x PP{pp}" + (f" x EP{ep}" if ep > 1 else "")
        self._check_mla()
        try:
            self.transformer_config(tp, pp, ep)
        except ValueError as exc:
            raise ValueError(f"Megatron-Core refuses {layout}: {exc}") from None

        tp_size, pp_size = "tensor_model_parallel_size", "pipeline_model_parallel_size"
        checks = [
            ("num_query_groups", self.refit_config().num_kv_heads, tp, tp_size),
            ("num_layers", self.spec.num_layers, pp, pp_size),
        ]
        if self.mla:  # the local spec's column-parallel down-projections
            hf = self.hf_config
            latent = hf.kv_lora_rank + hf.qk_rope_head_dim
            checks.append(("kv_lora_rank + qk_rope_head_dim", latent, tp, tp_size))
            if hf.q_lora_rank:
                checks.append(("q_lora_rank", hf.q_lora_rank, tp, tp_size))
        for what, value, by, mode in checks:
            if value % by:
                raise ValueError(
                    f"Megatron-Core refuses {layout}: {what} ({value}) must be a "
                    f"multiple of {mode} ({by})"
                )

    def _check_mla(self) -> None:
        """Refuse a DeepSeek-V3 config whose forward Megatron's MLA and router do not compute:
        ``ValueError`` naming the HF config field."""
        if not self.mla:
            return
        hf = self.hf_config
        rope = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
        group_top = hf.num_experts_per_tok // hf.topk_group
        for field, ok, why in (
            ("rope_interleave", hf.rope_interleave, "Megatron's MLA pairs rope dims as HF's True"),
            ("rope_parameters.rope_type", rope == "default", "plain RoPE only (no YaRN here)"),
            ("norm_topk_prob", hf.norm_topk_prob, "Megatron renormalizes sigmoid top-k scores"),
            ("num_experts_per_tok // topk_group", hf.n_group == 1 or group_top == 2,
             "HF scores a group by its top 2 experts, Megatron by its top k / topk_group"),
        ):  # fmt: skip
            if not ok:
                raise ValueError(f"deepseek_v3 {field}: not run through Megatron-Core ({why})")

    @property
    def rope_theta(self) -> float:
        """HF's RoPE base (Mixtral's is 1e6); GPT-2 has learned positions."""
        rope = getattr(self.hf_config, "rope_parameters", None) or {}
        return float(rope.get("rope_theta", 10000.0))

    @property
    def moe(self) -> bool:
        return bool(self.refit_config().num_experts)

    @property
    def mla(self) -> bool:
        return self.refit_config().mla

    def router_fields(self) -> dict:
        """DeepSeek-V3's router: sigmoid scores, the top k picked on scores plus the
        score-correction bias (Megatron's ``expert_bias``) within the best ``topk_group`` of
        ``n_group`` groups, the picked scores renormalized and scaled by
        ``routed_scaling_factor``. Megatron moves its expert bias only in its training loop's
        ``finalize_model_grads``, which the hand-run step does not call: it stays 0, HF's init."""
        hf = self.hf_config
        fields = dict(
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        )
        if hf.n_group > 1:
            fields.update(moe_router_num_groups=hf.n_group, moe_router_group_topk=hf.topk_group)
        return fields

    def moe_fields(self, tp: int, ep: int) -> dict:
        """TransformerConfig's MoE fields: HF's routing (softmax over the top k for Mixtral,
        which renormalizes, or top k of the softmax for ``norm_topk_prob=False``; DeepSeek's
        sigmoid router), no auxiliary loss, the local spec's one module per expert, HF's dense
        layers and shared expert."""
        cfg, hf = self.refit_config(), self.hf_config
        if not cfg.num_experts:
            return {}
        shared = getattr(hf, "shared_expert_intermediate_size", None)
        if getattr(hf, "n_shared_experts", None):
            shared = hf.moe_intermediate_size * hf.n_shared_experts
        return dict(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=hf.num_experts_per_tok,
            moe_ffn_hidden_size=cfg.intermediate_size,
            moe_layer_freq=[int(cfg.moe_layer(i)) for i in range(cfg.num_layers)],
            moe_router_pre_softmax=not getattr(hf, "norm_topk_prob", True),
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_token_dispatcher_type="allgather",
            moe_shared_expert_intermediate_size=shared,
            moe_shared_expert_gate=cfg.shared_gate,
            expert_model_parallel_size=ep,
            **(self.router_fields() if self.mla else {}),
        )

    def mla_fields(self) -> dict:
        """``MLATransformerConfig``'s fields from HF's DeepSeek-V3 config: HF's
        ``qk_nope_head_dim`` is Megatron's ``qk_head_dim``, ``qk_rope_head_dim`` its
        ``qk_pos_emb_head_dim``; plain RoPE (Megatron's MLA default is YaRN), which Megatron's
        MLA applies to de-interleaved pairs as HF does with ``rope_interleave``; the softmax
        scale is then ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)`` on both sides. The
        latent norms are ``qk_layernorm``'s."""
        hf = self.hf_config
        if not self.mla:
            return {}
        return dict(
            q_lora_rank=hf.q_lora_rank,
            kv_lora_rank=hf.kv_lora_rank,
            qk_head_dim=hf.qk_nope_head_dim,
            qk_pos_emb_head_dim=hf.qk_rope_head_dim,
            v_head_dim=hf.v_head_dim,
            rope_type="rope",
            rotary_base=self.rope_theta,
        )

    def transformer_config(self, tp: int, pp: int, ep: int = 1):
        from megatron.core.transformer import MLATransformerConfig, TransformerConfig

        s, gpt2, hf, cfg = self.spec, self.gpt2, self.hf_config, self.refit_config()
        return (MLATransformerConfig if self.mla else TransformerConfig)(
            num_layers=s.num_layers,
            hidden_size=s.hidden_size,
            num_attention_heads=s.num_heads,
            num_query_groups=cfg.num_kv_heads,
            ffn_hidden_size=4 * s.hidden_size if gpt2 else hf.intermediate_size,
            kv_channels=hf.v_head_dim if self.mla else s.hidden_size // s.num_heads,
            normalization="LayerNorm" if gpt2 else "RMSNorm",
            layernorm_epsilon=hf.layer_norm_epsilon if gpt2 else hf.rms_norm_eps,
            gated_linear_unit=not gpt2,
            activation_func=(lambda x: F.gelu(x, approximate="tanh")) if gpt2 else F.silu,
            add_bias_linear=gpt2,
            add_qkv_bias=cfg.qkv_bias,
            qk_layernorm=cfg.qk_norm or cfg.mla,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            params_dtype=torch.float32,
            pipeline_dtype=torch.float32,
            use_cpu_initialization=True,
            masked_softmax_fusion=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            **self.moe_fields(tp, ep),
            **self.mla_fields(),
        )

    def layer_spec(self, config):
        """The local (non-Transformer-Engine) spec: per layer for MoE models (dense and MoE
        layers mixed by ``moe_layer_freq``)."""
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_decoder_block_spec,
            get_gpt_layer_local_spec,
        )

        normalization = "LayerNorm" if self.gpt2 else "RMSNorm"
        if self.moe:
            block = get_gpt_decoder_block_spec(
                config, use_transformer_engine=False, normalization=normalization
            )
            if self.mla:
                for layer in block.layer_specs:
                    attention = layer.submodules.self_attention.submodules
                    attention.core_attention = _mla_local_attention()
            return block
        return get_gpt_layer_local_spec(
            normalization=normalization, qk_layernorm=config.qk_layernorm
        )


@functools.cache
def _mla_local_attention() -> type:
    """Megatron's local ``DotProductAttention`` as MLA's core attention. ``MLASelfAttention``
    builds its core attention with ``k_channels`` and ``v_channels``, which only Transformer
    Engine's attention takes (the local one raises ``TypeError: ... unexpected keyword argument
    'k_channels'``); the local one needs neither: MLA also passes its softmax scale, and
    ``kv_channels = v_head_dim`` gives the output width. Same computation, two arguments
    dropped."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)

    return MLADotProductAttention


class MegatronTrainer:
    """One Megatron-Core trainer rank (one TP shard of one PP stage) in this process.

    Builds the default process group over the trainer ranks only (``store`` is the run's,
    ``world_size`` the trainer count), checks that Megatron numbers this rank as the simulator's
    topology does, and builds its stage of the model.
    """

    def __init__(
        self, info: RankInfo, kind: str, spec: TinyModelSpec, store: dist.Store, timeout_s: float
    ):
        assert info.role == "trainer", info
        self.info = info
        self.model_spec = MegatronModelSpec(kind, spec)
        self.refit_config = self.model_spec.refit_config()
        torch.cuda.current_device = lambda: torch.device("cpu")  # this trainer process only
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.models.gpt import GPTModel
        from megatron.core.transformer import multi_latent_attention
        from megatron.core.transformer.moe import moe_utils

        # Megatron-Core 0.16.1 leaves this name undefined without Transformer Engine, and the
        # router's gating reads it before anything else
        moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
        # ... and MLA's module believes Transformer Engine is installed (its extensions import
        # without it, as mocks), then fails on ``isinstance(self.linear_proj, TELinear)``
        multi_latent_attention.HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
        tp, pp, ep = info.tp_size, info.pp_size, info.ep_size
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                store=dist.PrefixStore("megatron", store),
                rank=info.global_rank,
                world_size=tp * pp * ep,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
        )
        ranks = (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_expert_model_parallel_rank(),
        )
        if ranks != (info.tp_rank, info.pp_rank, info.ep_rank):
            raise RuntimeError(
                f"Megatron numbers global rank {info.global_rank} (tp, pp, ep) = {ranks}, the "
                f"simulator's topology {(info.tp_rank, info.pp_rank, info.ep_rank)}"
            )
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True)
        # Megatron's CPU init: the same on every TP and EP rank (EP ranks are data-parallel
        # replicas of the dense weights)
        torch.manual_seed(1234 + info.pp_rank)
        self.first = parallel_state.is_pipeline_first_stage()
        self.last = parallel_state.is_pipeline_last_stage()
        mspec = self.model_spec
        config = mspec.transformer_config(tp, pp, ep)
        self.model = GPTModel(
            config,
            mspec.layer_spec(config),
            vocab_size=padded_vocab_size(spec.vocab_size, tp),
            max_sequence_length=GPT2_POSITIONS if mspec.gpt2 else 2048,
            pre_process=self.first,
            post_process=self.last,
            parallel_output=False,
            share_embeddings_and_output_weights=mspec.tied,
            position_embedding_type="learned_absolute" if mspec.gpt2 else "rope",
            rotary_base=mspec.rope_theta,
        )
        if mspec.moe and tp > 1:
            # Megatron's MoE layer refuses to train at TP > 1 without sequence parallelism (a
            # performance guard), which its local norms do not support (Transformer Engine's
            # and apex's do; neither installs here). In eval mode the step is the same
            # computation: dropout is 0 and there is no auxiliary loss.
            self.model.eval()
        self.layer_offset = self.model.decoder.layers[0].layer_number - 1
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.prompt = fixed_prompt(spec.vocab_size)  # (1, S): the oracle's logits
        self.batch, self.labels = training_batch(spec.vocab_size)
        self.steps = 0

    @staticmethod
    def _inputs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = ids.shape[1]
        positions = torch.arange(s).unsqueeze(0)  # (1, S)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]  # True = masked
        return ids, positions, mask

    def _stage(self, ids: torch.Tensor, grad: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run this stage on ``ids`` (B, S): (input activation received, stage output: the
        hidden states [S, B, H], or on the last stage the logits [B, S, padded V])."""
        from megatron.core import parallel_state

        received = None
        if not self.first:
            (b, s), h = ids.shape, self.model_spec.spec.hidden_size
            received = torch.empty(s, b, h)  # [S, B, H]
            dist.recv(received, parallel_state.get_pipeline_model_parallel_prev_rank())
            received.requires_grad_(grad)
            self.model.set_input_tensor(received)
        out = self.model(*self._inputs(ids))
        if not self.last:
            dist.send(out.detach(), parallel_state.get_pipeline_model_parallel_next_rank())
        return received, out

    def step(self) -> None:
        """One SGD step on the training batch (a new weight version)."""
        from megatron.core import parallel_state

        self.optimizer.zero_grad()
        received, out = self._stage(self.batch, grad=True)
        if self.last:
            vocab = self.model_spec.spec.vocab_size
            F.cross_entropy(out[..., :vocab].flatten(0, 1), self.labels.flatten()).backward()
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, parallel_state.get_pipeline_model_parallel_next_rank())
            out.backward(grad)
        if received is not None:
            assert received.grad is not None
            dist.send(received.grad, parallel_state.get_pipeline_model_parallel_prev_rank())
        self._reduce_replicated_grads()
        self.optimizer.step()
        self.steps += 1

    def _reduce_replicated_grads(self) -> None:
        """What Megatron's ``finalize_model_grads`` does for weights several ranks hold:

        * over TP, gradients are summed for the replicated weights that see only this rank's
          heads (q/k layernorms), and averaged for the weights every TP rank computes whole
          (the MoE router, the shared-expert gate, MLA's latent norms, which see the gathered
          latent): the expert backward sums in a rank's own order, so they differ in the last
          bits (6e-11 measured at EP2 x TP2) and the copies would drift;
        * over data parallelism (the EP ranks are data-parallel replicas of every weight but
          their experts, which Megatron marks ``allreduce=False``), gradients are averaged; an
          expert's gradient, already summed over the tokens of every EP rank, is divided by
          the data-parallel size as Megatron's ``DistributedDataParallel`` does
          (``expert_gradient_scaling_factor``).

        Skipped, the copies drift apart (receivers catch it: their digests disagree)."""
        from megatron.core import parallel_state

        tp, ep = self.info.tp_size, self.info.ep_size
        tp_group = parallel_state.get_tensor_model_parallel_group()
        dp_group = parallel_state.get_data_parallel_group()
        for name, param in self.model.named_parameters():
            if param.grad is None:
                continue
            how = self._tp_reduction(name) if tp > 1 else None
            if how in ("sum", "mean"):
                dist.all_reduce(param.grad, group=tp_group)
            if how == "mean":
                param.grad /= tp
            if ep > 1:
                if getattr(param, "allreduce", True):
                    dist.all_reduce(param.grad, group=dp_group)
                param.grad /= ep

    def _tp_reduction(self, name: str) -> str | None:
        """How parameter ``name``'s gradient is made whole over TP: ``"sum"``, ``"mean"`` or
        None (a TP shard: nothing to reduce)."""
        mla_norm = self.model_spec.mla and ("q_layernorm" in name or "kv_layernorm" in name)
        if mla_norm or "mlp.router." in name or "gate_weight" in name:
            return "mean"
        return "sum" if "q_layernorm" in name or "k_layernorm" in name else None

    def advance_to(self, version: int) -> None:
        """Version v is Megatron's init after ``v - 1`` optimizer steps."""
        while self.steps < version - 1:
            self.step()

    @torch.no_grad()
    def logits(self) -> torch.Tensor | None:
        """Megatron's own logits on the fixed prompt (last stage; real vocab columns), (1, S, V)."""
        _, out = self._stage(self.prompt, grad=False)
        return out[..., : self.model_spec.spec.vocab_size].clone() if self.last else None

    def shards(self, version: int) -> list:
        """This rank's own parameters at ``version`` as ``(descriptor, shard)`` pairs."""
        self.advance_to(version)
        return self.own_shards()

    def own_shards(self) -> list:
        """This rank's parameters as they are, as ``(descriptor, view)`` pairs."""
        return shards_from_megatron(
            self.model.named_parameters(),
            self.refit_config,
            tp=(self.info.tp_rank, self.info.tp_size),
            ep=(self.info.ep_rank, self.info.ep_size),
            layer_offset=self.layer_offset,
        )


def training_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, 8) holding every token of the vocab (7 is prime to the tiny vocabs), and
    their next-token labels: every embedding row, on every vocab shard of a sharded receiver,
    changes at each step."""
    length = -(-vocab_size // 8) * 8
    tokens = fixed_prompt(vocab_size, length=length).view(-1, 8)
    return tokens, (tokens + 1) % vocab_size


def _oracle_key(version: int) -> str:
    return f"oracle/logits/v{version}"


def post_logits(store: dist.Store, version: int, logits: torch.Tensor) -> None:
    """Put the trainer's logits of ``version`` where every receiver of the run can read them."""
    payload = [list(logits.shape), logits.contiguous().numpy().tobytes()]
    store.set(_oracle_key(version), msgspec.msgpack.encode(payload))  # type: ignore[arg-type]


class MegatronLogits:
    """The receivers' oracle in a Megatron run: the trainer's own logits, read from the run's
    store; the trainer's values are not known tensor by tensor (``params`` is None).

    ``atol``: the trainer's TP forward all-reduces partial sums in another order than a one-rank
    HF forward adds them, so fp32 logits agree to about 1e-7 at TP 1 and 1e-6 at TP 2, not bit
    for bit; 1e-5 leaves room for that and none for a layout bug (a wrong QKV interleave or
    gate/up split is off by about 1).
    """

    atol = 1e-5

    def __init__(self, store: dist.Store):
        self.store = store

    def params(self, version: int) -> None:
        return None

    def logits(self, version: int) -> torch.Tensor:
        key = _oracle_key(version)
        self.store.wait([key])
        shape, raw = msgspec.msgpack.decode(self.store.get(key), type=tuple[list[int], bytes])
        return torch.frombuffer(bytearray(raw), dtype=torch.float32).view(shape)


def load_shards(trainer: MegatronTrainer, shards: list) -> None:
    """Copy converted shards (``megatron_shards_from_hf`` of an HF checkpoint, this rank's)
    into the trainer's parameters: the inverse of :meth:`MegatronTrainer.shards`, padding
    vocab rows zeroed. A parameter no shard fills is a ``ValueError`` naming it."""
    by_name = {d.name: t for d, t in shards}
    published = trainer.own_shards()  # (descriptor, view of the parameter)
    if set(by_name) != {d.name for d, _ in published}:
        missing = sorted({d.name for d, _ in published} ^ set(by_name))
        raise ValueError(f"load_shards: shards and parameters differ: {missing[:3]}")
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.zero_()  # vocab padding rows stay zero; every other byte is overwritten
        for desc, view in published:
            view.copy_(by_name[desc.name])


def loaded_logits_and_grads(rank: int, kind: str, spec: TinyModelSpec, topology, shards, addr):
    """One Megatron rank of ``topology`` (trainers only) loaded with ``shards[rank]``: its
    logits on the fixed prompt (last stage, else None) and its gradients of the mean
    next-token loss, as ``(descriptor, gradient shard)`` pairs (a ``launch`` rank body; arrays
    go back as numpy, pickled by value: a torch tensor would be shared memory of an exited
    process)."""
    trainer = MegatronTrainer(topology.rank_info(rank), kind, spec, addr.connect(), 30.0)
    load_shards(trainer, shards[rank])
    logits = trainer.logits()
    trainer.optimizer.zero_grad()
    trainer.optimizer.param_groups[0]["lr"] = 0.0  # the step only fills .grad here
    trainer.step()
    grads = shards_from_megatron(
        [(n, p.grad) for n, p in trainer.model.named_parameters()],
        trainer.refit_config,
        tp=(trainer.info.tp_rank, trainer.info.tp_size),
        ep=(trainer.info.ep_rank, trainer.info.ep_size),
        layer_offset=trainer.layer_offset,
    )
    return (None if logits is None else logits.numpy()), [(d, t.numpy()) for d, t in grads]
