"""Discovery scenario: a synthetic model with every hard case, and each tiny HF model.

Also home of the two things tests and the benchmark share: :func:`build_synthetic_model` (an
MoE-shaped model with ties, views, non-contiguous buffers, zero-size parameters and tensors held
by plain objects) and :func:`coverage_errors`, an oracle that checks a published set byte by
byte, independently of how discovery computed it.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mx_reference.backends import CudaBackend
from mx_reference.discovery import (
    STORAGE_SUFFIX,
    DiscoveryManifest,
    PublishedTensor,
    capture_tensor_attrs,
    discover,
)
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import MODEL_BUILDERS, build_tiny_model
from mx_sim.report import ScenarioResult


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic model; ``experts`` sets most of the tensor count (3 per expert)."""

    layers: int = 4
    experts: int = 8
    hidden: int = 4
    vocab: int = 16

    def published_per_layer(self) -> int:
        # norm, qkv, o_proj, empty bias, 3 per expert, rope (+ its head view as alias),
        # w_uk_t storage, 3 adopted hidden tensors, the captured weight_scale
        return 4 + 3 * self.experts + 2 + 3 + 1

    def published(self) -> int:
        return 1 + self.layers * self.published_per_layer()  # + embedding (lm_head tied to it)


class _QuantConfig:
    """A plain object holding derived tensors, like vLLM's FusedMoE quant configs."""

    def __init__(self, hidden: int) -> None:
        self.scales = {"a1_gscale": torch.ones(1), (torch.float16, 0): torch.full((hidden,), 2.0)}
        self.empty = torch.empty(0)  # zero-size: nothing to move, never adopted
        self.fused_args: tuple = ()


class _SlotHolder:
    __slots__ = ("scale", "owner")


class _Expert(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, hidden))
        self.w2 = nn.Parameter(torch.randn(hidden, hidden))
        self.w3 = nn.Parameter(torch.randn(hidden, hidden))


class _Layer(nn.Module):
    def __init__(self, cfg: SyntheticConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.norm = nn.Parameter(torch.ones(h))
        self.qkv = nn.Parameter(torch.randn(3 * h, h))
        self.o_proj = nn.Parameter(torch.randn(h, h))
        self.empty_bias = nn.Parameter(torch.empty(0))
        self.experts = nn.ModuleList(_Expert(h) for _ in range(cfg.experts))
        rope = torch.randn(2 * h)
        self.register_buffer("rope_head", rope[:h])  # a smaller view seen before the full tensor
        self.register_buffer("rope", rope)
        self.register_buffer("w_uk_t", torch.randn(h, 2 * h).t())  # non-contiguous
        self.quant_method = _QuantConfig(h)  # hidden: dict with str and tuple keys
        holder = _SlotHolder()
        holder.scale = torch.full((h,), 0.5)  # hidden behind __slots__
        holder.owner = self.quant_method  # a cycle back to the config
        self.quant_method.fused_args = (holder, [holder])


class SyntheticModel(nn.Module):
    def __init__(self, cfg: SyntheticConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied


def _hidden_of(layer: _Layer) -> list[torch.Tensor]:
    """The tensors a layer holds outside its parameters and buffers (the scan must find)."""
    config = layer.quant_method
    return [*config.scales.values(), config.fused_args[0].scale]


def post_process(model: SyntheticModel) -> None:
    """Post-load processing that creates tensors (like FP8 weight scales) as bare attributes."""
    for layer in model.layers:
        layer.weight_scale = layer.qkv.detach().abs().amax().reshape(1)


def build_synthetic_model(cfg: SyntheticConfig, *, seed: int = 0) -> SyntheticModel:
    """The synthetic model, post-processed under capture (so its scales become buffers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SyntheticModel(cfg)
    with capture_tensor_attrs(model, CpuMockBackend()):
        post_process(model)
    return model


def _element_addresses(t: torch.Tensor) -> np.ndarray:
    """Start address of every element of a non-empty tensor, shape (numel,)."""
    offsets = np.zeros(1, dtype=np.int64)
    for size, stride in zip(t.shape, t.stride(), strict=True):
        offsets = (offsets[:, None] + np.arange(size, dtype=np.int64) * stride).reshape(-1)
    return t.untyped_storage().data_ptr() + (t.storage_offset() + offsets) * t.element_size()


def coverage_errors(
    published: list[PublishedTensor],
    named: Iterable[tuple[str, torch.Tensor]],
    loose: Iterable[torch.Tensor],
    is_accel: Callable[[object], bool],
) -> list[str]:
    """What is wrong with ``published`` as the publication of ``named`` and ``loose`` tensors.

    ``named`` are the registered tensors (every name, ties included); ``loose`` are tensors held
    elsewhere that must be covered too. Checks: every published tensor is an accelerator tensor
    and contiguous; no byte is published twice; every byte of every accelerator tensor lies in a
    published entry; every accelerator name appears exactly once as an entry name or an alias,
    and nothing else does.
    """
    errors = []
    spans = []
    for p in published:
        if not is_accel(p.tensor) or not p.tensor.is_contiguous():
            errors.append(f"{p.name}: published tensor is not a contiguous accelerator tensor")
        if p.tensor.numel():
            spans.append((p.tensor.data_ptr(), p.tensor.data_ptr() + p.tensor.nbytes, p.name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            errors.append(f"{a} and {b} overlap: bytes registered twice")
    starts = np.array([s for s, _, _ in spans], dtype=np.int64)
    ends = np.array([e for _, e, _ in spans] + [0], dtype=np.int64)  # [-1]: before every entry

    named = list(named)
    accel_names = [n for n, t in named if is_accel(t)]
    listed = [p.name for p in published if not p.name.endswith(STORAGE_SUFFIX)]
    listed += [a for p in published for a in p.aliases]
    for name in sorted(set(accel_names) | set(listed)):
        count = listed.count(name)
        if name not in accel_names or count != 1:
            errors.append(f"{name}: published {count} times, expected {int(name in accel_names)}")

    for t in [t for _, t in named] + list(loose):
        if not is_accel(t) or t.numel() == 0:
            continue
        addr = _element_addresses(t)
        idx = np.searchsorted(starts, addr, side="right") - 1
        ok = addr + t.element_size() <= ends[idx]
        if not ok.all():
            errors.append(
                f"tensor {tuple(t.shape)} at {t.data_ptr():#x}: {int((~ok).sum())} elements not covered"
            )
    return errors


def expected_hf_entries(model: nn.Module) -> tuple[int, int]:
    """(entries, aliases) from ``state_dict`` plus non-persistent buffers, tied by pointer."""
    tensors = dict(model.state_dict(keep_vars=True))
    tensors.update(model.named_buffers(remove_duplicate=False))
    by_ptr: dict[int, int] = {}
    for t in tensors.values():
        by_ptr[t.data_ptr()] = by_ptr.get(t.data_ptr(), 0) + 1
    return len(by_ptr), len(tensors) - len(by_ptr)


def _check(name: str, model: nn.Module, loose: list[torch.Tensor], expected: int) -> ScenarioResult:
    start = time.perf_counter()
    mock, cuda = CpuMockBackend(), CudaBackend()
    published = discover(model, mock)
    elapsed = time.perf_counter() - start
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    errors = coverage_errors(published, named, loose, mock.is_accel_tensor)
    if len(published) != expected:
        errors.append(f"{len(published)} entries published, expected {expected}")
    if discover(model, cuda):
        errors.append("the CUDA backend published CPU tensors")
    aliases = sum(len(p.aliases) for p in published)
    return ScenarioResult(
        name=f"discovery/{name}",
        passed=not errors,
        detail="; ".join(errors[:3]) or f"{name}: {len(published)} tensors, {aliases} aliases",
        seconds=elapsed,
        details={"digest": DiscoveryManifest.of(published).digest(), "errors": errors},
    )


def run(out_dir: pathlib.Path, quick: bool) -> list[ScenarioResult]:
    """Discovery on the synthetic model (twice: the manifests must match) and each tiny model."""
    cfg = SyntheticConfig(layers=2 if quick else 4)
    first, second = build_synthetic_model(cfg), build_synthetic_model(cfg)
    loose = [hidden for layer in first.layers for hidden in _hidden_of(layer)]
    results = [_check("synthetic", first, loose, cfg.published())]
    same = DiscoveryManifest.of(discover(second, CpuMockBackend())).digest()
    if same != results[0].details["digest"]:
        results[0].passed = False
        results[0].detail = "two builds of the synthetic model published different manifests"
    for kind in MODEL_BUILDERS:
        model = build_tiny_model(kind)
        results.append(_check(kind, model, [], expected_hf_entries(model)[0]))
    return results
