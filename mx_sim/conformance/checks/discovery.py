"""Conformance checks: discovery.*

Every check builds a model, lets the adapter discover it, and judges the published set with the
byte-level oracle :func:`mx_sim.scenarios.discovery.coverage_errors`: every accelerator byte
(parameters, buffers and hidden tensors, found by the reference scan before the adapter runs)
published exactly once, every accelerator name exactly once as an entry name or alias, and
nothing the backend rejects.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mx_reference import adapter as caps
from mx_reference.backends import AcceleratorBackend, CudaBackend
from mx_reference.discovery import DiscoveryManifest, find_hidden_accel_tensors
from mx_sim.conformance.catalog import check
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.scenarios.discovery import SyntheticConfig, build_synthetic_model, coverage_errors

SYNTHETIC = SyntheticConfig(layers=1, experts=2)


def _synthetic(device: torch.device | str) -> nn.Module:
    """The synthetic model on ``device``, plus a buffer no accelerator backend accepts.

    Views at one start pointer (the smaller seen first), a non-contiguous view, zero-size
    tensors, a tie, and tensors hidden in plain objects, dicts and ``__slots__``.
    """
    with torch.device(device):
        model = build_synthetic_model(SYNTHETIC)
    model.register_buffer("foreign", torch.zeros(4, device="meta"))
    return model


def _expect_exact_cover(
    adapter, model: nn.Module, what: str, backend: AcceleratorBackend | None = None
) -> list:
    """Discover ``model`` with the adapter and fail unless it covers every byte exactly once."""
    is_accel = (backend or adapter.backend).is_accel_tensor
    loose = [h.tensor for h in find_hidden_accel_tensors(model, backend or adapter.backend)]
    published = adapter.discover_tensors(model, backend)
    # Names are read after discovery: adopted hidden tensors are buffers by then.
    named: list[tuple[str, torch.Tensor]] = [*model.named_parameters(remove_duplicate=False)]
    named += model.named_buffers(remove_duplicate=False)
    errors = coverage_errors(published, named, loose, is_accel)
    # The oracle names a tensor by address; say which module tensor lives there.
    at = {f"{tuple(t.shape)} at {t.data_ptr():#x}": name for name, t in reversed(named)}
    errors = [re.sub(r"\(.*\) at 0x[0-9a-f]+", lambda m: at.get(m[0], m[0]), e) for e in errors]
    if errors:
        raise AssertionError(f"{what}: {len(errors)} coverage errors: " + "; ".join(errors[:4]))
    return published


@check("discovery.hf_llama")
def hf_llama(adapter) -> None:
    """Discovery publishes every byte of a tiny HF Llama exactly once, under every name."""
    _expect_exact_cover(adapter, adapter.build_model("llama"), "llama")


@check("discovery.hf_mixtral", requires=(caps.MOE,))
def hf_mixtral(adapter) -> None:
    """Discovery publishes every byte of a tiny HF Mixtral (fused stacked experts) exactly once."""
    _expect_exact_cover(adapter, adapter.build_model("mixtral"), "mixtral")


def _tie_entry(published: list, name: str, tied: str, what: str) -> None:
    entries = [p for p in published if name == p.name or name in p.aliases]
    if len(entries) != 1:
        raise AssertionError(f"{what}: {name} is in {len(entries)} entries, expected 1")
    names = (entries[0].name, *entries[0].aliases)
    if tied not in names:
        raise AssertionError(f"{what}: tied {tied} is not an alias of the entry {entries[0].name}")


@check("discovery.tied_once", requires=(caps.TIED_EMBEDDINGS,))
def tied_once(adapter) -> None:
    """Tied embeddings are published once, the other name an alias (GPT-2, tied Llama)."""
    gpt2 = adapter.build_model("gpt2")
    published = _expect_exact_cover(adapter, gpt2, "gpt2")
    _tie_entry(published, "transformer.wte.weight", "lm_head.weight", "gpt2")
    llama = adapter.build_model("llama", tie_word_embeddings=True)
    published = _expect_exact_cover(adapter, llama, "tied llama")
    _tie_entry(published, "model.embed_tokens.weight", "lm_head.weight", "tied llama")


@check("discovery.hard_cases")
def hard_cases(adapter) -> None:
    """Views at one start pointer, non-contiguous and empty tensors, hidden attributes: exact cover."""
    model = _synthetic(adapter.backend.torch_device())
    _expect_exact_cover(adapter, model, "synthetic model")


@check("discovery.backend_predicate")
def backend_predicate(adapter) -> None:
    """Discovery follows the backend it is given: CPU tensors never under CUDA, all under a CPU mock."""
    published = adapter.discover_tensors(_synthetic("cpu"), CudaBackend())
    names = [p.name for p in published]
    if published:
        raise AssertionError(f"the CUDA backend published {len(names)} CPU tensors: {names[:4]}")
    _expect_exact_cover(adapter, _synthetic("cpu"), "CPU model, CPU mock backend", CpuMockBackend())
    own = adapter.backend
    if own.is_accel_tensor(torch.zeros(1)):
        _expect_exact_cover(adapter, _synthetic("cpu"), f"CPU model, {own.name} backend")
    else:
        published = adapter.discover_tensors(_synthetic("cpu"))
        if published:
            raise AssertionError(f"the {own.name} backend published {len(published)} CPU tensors")


@dataclasses.dataclass
class _KvCacheSpec:
    cache: torch.Tensor


class _SlotCache:
    __slots__ = ("cache",)

    def __init__(self, cache: torch.Tensor) -> None:
        self.cache = cache


_CONTAINERS: dict[str, Callable[[torch.Tensor], Any]] = {
    "list": lambda t: [t],  # vLLM attention layers keep kv_cache in a list
    "tuple": lambda t: (None, t),
    "dict": lambda t: {"kv": t},
    "dataclass": _KvCacheSpec,
    "slots": _SlotCache,
    "nested": lambda t: {"caches": [(_KvCacheSpec(t),)]},
}


@check("discovery.hidden_containers")
def hidden_containers(adapter) -> None:
    """A tensor hidden in each container discovery walks (list, tuple, dict, dataclass,
    ``__slots__``, nested) on an attention module is published."""
    for kind, wrap in _CONTAINERS.items():
        model = adapter.build_model("llama")
        attn = model.model.layers[0].self_attn
        attn.kv_cache = wrap(torch.full((3, 5), 7.0, device=adapter.backend.torch_device()))
        _expect_exact_cover(adapter, model, f"llama with a tensor hidden in a {kind}")


@check("discovery.offset_views")
def offset_views(adapter) -> None:
    """Contiguous views at an offset inside a published tensor (a registered buffer and a
    hidden attribute) are aliases of it, not entries of their own: every byte exactly once."""
    model = adapter.build_model("llama")
    proj = model.model.layers[0].self_attn.q_proj
    proj.register_buffer("head_1", proj.weight.detach()[16:32], persistent=False)  # rows 16..31
    proj.rows_tail = proj.weight.detach()[-8:]  # hidden: the last 8 rows
    _expect_exact_cover(adapter, model, "llama with offset views of q_proj.weight")


def _state(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """What discovery may not change: every registered tensor's name, shape and address."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    return [(name, tuple(t.shape), t.data_ptr()) for name, t in named]


@check("discovery.foreign_backend_side_effects")
def foreign_backend_side_effects(adapter) -> None:
    """Discovery under a backend that accepts none of the model's tensors (CUDA, for a model
    elsewhere; a CPU mock, for a CUDA model) publishes nothing and changes nothing: no
    adopted buffers, no moved tensors."""
    own_device = adapter.backend.torch_device()
    foreign = CpuMockBackend() if own_device.type == "cuda" else CudaBackend()
    model = _synthetic(own_device)
    before = _state(model)
    published = adapter.discover_tensors(model, foreign)
    if published:
        raise AssertionError(
            f"the {foreign.name} backend published {len(published)} tensors it rejects: "
            f"{[p.name for p in published][:4]}"
        )
    after = _state(model)
    if after != before:
        added = sorted({n for n, *_ in after} - {n for n, *_ in before})
        raise AssertionError(
            f"discovery under the {foreign.name} backend changed the model "
            f"({len(after) - len(before)} registered tensors more: {added[:4]})"
        )


def _digest(adapter, build: Callable[[], nn.Module]) -> str:
    return DiscoveryManifest.of(adapter.discover_tensors(build())).digest()


@check("discovery.manifest_deterministic")
def manifest_deterministic(adapter) -> None:
    """Two identical builds publish the same names in the same order (equal manifest digests)."""
    for what, build in (
        ("llama", lambda: adapter.build_model("llama", seed=0)),
        ("synthetic model", lambda: _synthetic(adapter.backend.torch_device())),
    ):
        first, second = _digest(adapter, build), _digest(adapter, build)
        if first != second:
            raise AssertionError(f"{what}: two builds gave manifest digests {first} and {second}")


def _fp8_post_load(model: Any) -> None:
    """Post-load processing shaped like FP8 quantization: a per-tensor scale per projection
    assigned as a bare attribute, and input scales held by a plain quant-config object."""
    for layer in model.model.layers:
        proj = layer.self_attn.q_proj
        proj.weight_scale = proj.weight.detach().abs().amax().reshape(1) / 448.0
        layer.mlp.quant_config = _QuantConfig(proj.weight.device)


class _QuantConfig:
    def __init__(self, device: torch.device) -> None:
        self.input_scale = torch.full((2,), 0.25, device=device)


def _mla_finalizer(model: Any) -> None:
    """A finalizer shaped like vLLM's MLA ``process_weights_after_loading``: absorbed
    projections built from the loaded weights, assigned as bare attributes."""
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.W_UK_T = attn.k_proj.weight.detach().t().contiguous()
        attn.W_UV = attn.v_proj.weight.detach().clone()


@check("discovery.finalizer_capture")
def finalizer_capture(adapter) -> None:
    """Tensors a model-specific finalizer creates (the engine's second capture site) are
    published under their attribute names, under the adapter's backend."""
    model = adapter.build_model("llama")
    adapter.finalize(model, _mla_finalizer)
    published = _expect_exact_cover(adapter, model, "llama after an MLA-style finalizer")
    names = {n for p in published for n in (p.name, *p.aliases)}
    for i in range(len(model.model.layers)):
        for attr in ("W_UK_T", "W_UV"):
            name = f"model.layers.{i}.self_attn.{attr}"
            if name not in names:
                raise AssertionError(f"finalizer tensor {name} is not published under its name")


@check("discovery.post_load_capture", requires=(caps.FP8,))
def post_load_capture(adapter) -> None:
    """Tensors created by post-load processing are published, under their attribute names."""
    model = adapter.build_model("llama")
    adapter.post_load(model, _fp8_post_load)
    published = _expect_exact_cover(adapter, model, "llama after FP8 post-load")
    names = {n for p in published for n in (p.name, *p.aliases)}
    for i in range(len(model.model.layers)):
        name = f"model.layers.{i}.self_attn.q_proj.weight_scale"
        if name not in names:
            raise AssertionError(f"post-load scale {name} is not published under its name")

    def build() -> nn.Module:
        m = adapter.build_model("llama")
        adapter.post_load(m, _fp8_post_load)
        return m

    first, second = _digest(adapter, build), _digest(adapter, build)
    if first != second:
        raise AssertionError(f"post-loaded llama: manifest digests {first} and {second} differ")
