"""The sharded inference engine: a real HF model under transformers' own tensor parallelism.

One process per rank, the replica's ranks forming the default gloo process group, the model
loaded from a locally saved checkpoint by ``from_pretrained(distributed_config=...)``, so the
real loading path runs. Each rank then holds what vLLM's ranks hold: column-parallel q/k/v and
gate/up rows, row-parallel o_proj/down_proj columns, vocab rows of the embedding and lm_head
(logits all-gathered by transformers), replicated norms. Two things transformers does not do
are done here, as an engine would (``../shared/reference/engines.md`` section 2):

* **compact storages**: after loading, a ``Shard(0)`` local tensor is a view into a full-size
  copy of the weight; each shard is rebuilt in its own storage, so the refit path (and a
  registration of that storage) sees only the shard;
* **KV heads repeated when TP exceeds them** (T > G): k_proj/v_proj load replicated, then each
  rank keeps head ``rank // (T / G)`` and its attention's ``num_key_value_groups`` becomes the
  local q heads; that layout is no DTensor placement, so it is declared
  (:class:`~mx_reference.refit.shards.SlicePart`).

The suite's own cut of a version's full weights, the oracle of these shards, is
:func:`mx_sim.conformance.sharded_adapter.expected_shards`.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import torch
import torch.distributed as dist

from mx_reference.refit.apply import model_parameters
from mx_reference.refit.layouts import hf_meta
from mx_reference.refit.shards import SlicePart, dtensor_layout
from mx_sim.fixtures import TinyModelSpec, version_model

# a TP forward sums in another order: 1.5e-7 measured in fp32 (engines.md); bf16 rounds each
# partial sum to 8 bits of mantissa
TP_LOGITS_ATOL = {"float32": 1e-5, "bfloat16": 5e-2}
KV_PROJ = re.compile(r"(.*\.self_attn)\.([kv])_proj\.(weight|bias)$")


def save_checkpoint(kind: str, spec: TinyModelSpec, directory: Path) -> Path:
    """Save the version-0 model (weights no trainer publishes) for the engine ranks to load."""
    version_model(kind, spec, 0).save_pretrained(directory)
    return directory


def init_replica_group(store: dist.Store, replica: int, rank: int, size: int, timeout_s: float):
    """The replica's ranks as this process's default group: transformers builds its device
    mesh over the default group's world."""
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"hf-tp/replica{replica}", store),
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.group.WORLD


def load_tp_model(checkpoint: Path, tp_size: int) -> torch.nn.Module:
    """``from_pretrained`` (the checkpoint's dtype) under ``DistributedConfig(tp_size)`` with eager attention (SDPA's
    GQA path would hide a wrong KV group count), storages compacted, KV heads repeated when
    ``tp_size`` exceeds them."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.utils import logging

    logging.disable_progress_bar()  # one bar per rank and load otherwise

    config = AutoConfig.from_pretrained(checkpoint)
    repeat_kv = tp_size > config.num_key_value_heads
    plan = None
    if repeat_kv:
        plan = {f"model.layers.*.self_attn.{p}_proj": "replicate" for p in "kv"}
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        dtype="auto",  # the checkpoint's own
        distributed_config=DistributedConfig(tp_size=tp_size, tp_plan=plan),
        attn_implementation="eager",
    )
    _compact(model)
    if repeat_kv:
        _keep_own_kv_head(model, tp_size)
    return model.eval()


def _compact(model: torch.nn.Module) -> None:
    """Rebuild every DTensor parameter's local shard in a storage of its own (a tied
    parameter stays one object under all its names)."""
    from torch.distributed.tensor import DTensor

    rebuilt: dict[int, torch.nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if not isinstance(p, DTensor):
            continue
        if id(p) not in rebuilt:
            local = p.to_local().clone()
            new = DTensor.from_local(
                local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
            rebuilt[id(p)] = torch.nn.Parameter(new, requires_grad=False)
        module, leaf = _owner(model, name)
        setattr(module, leaf, rebuilt[id(p)])


def _keep_own_kv_head(model: torch.nn.Module, tp_size: int) -> None:
    rank = dist.get_rank()
    for name, p in list(model_parameters(model).items()):
        match = KV_PROJ.match(name)
        if match is None:
            continue
        lo, hi = kv_head_rows(model.config, tp_size, rank)
        module, leaf = _owner(model, name)
        setattr(module, leaf, torch.nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=False))
        attention = model.get_submodule(match.group(1))
        attention.num_key_value_groups = model.config.num_attention_heads // tp_size


def kv_head_rows(config, tp_size: int, rank: int) -> tuple[int, int]:
    """vLLM's repeated KV: with T ranks over G < T heads, rank r holds head r // (T / G)."""
    g = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    head = rank // (tp_size // g)
    return head * d, (head + 1) * d


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return model.get_submodule(path), leaf


def engine_layout(
    model: torch.nn.Module, tp_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[SlicePart, ...]], dict[str, torch.Tensor]]:
    """Local tensors, layout and full HF parameters (meta): DTensor placements, plus the
    declared repeated KV heads, whose full shape the local tensor no longer shows."""
    local, layout = dtensor_layout(model)
    meta = hf_meta(model)
    g = model.config.num_key_value_heads
    if tp_size > g:
        for name, t in local.items():
            if KV_PROJ.match(name):
                lo, hi = kv_head_rows(model.config, tp_size, dist.get_rank())
                layout[name] = (SlicePart(name, 0, lo, hi),)
                meta[name] = torch.empty(
                    (g * (hi - lo), *t.shape[1:]), dtype=t.dtype, device="meta"
                )
    return local, layout, meta
