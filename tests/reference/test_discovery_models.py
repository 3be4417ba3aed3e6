"""Discovery on real HF models, random module trees (hypothesis), across processes, on a GPU."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mx_reference.backends import CudaBackend
from mx_reference.discovery import (
    MAX_HIDDEN_DEPTH,
    DiscoveryManifest,
    adopt_hidden_tensors,
    capture_tensor_attrs,
    collect_module_tensors,
    discover,
    find_hidden_accel_tensors,
)
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import MODEL_BUILDERS, build_tiny_model
from mx_sim.scenarios import discovery as scenario
from mx_sim.scenarios.discovery import (
    SyntheticConfig,
    build_synthetic_model,
    coverage_errors,
    expected_hf_entries,
)


class FusedMoEQuantConfig:
    """Like vLLM's: derived scales on a plain object, invisible to named_buffers()."""

    def __init__(self, device: str = "cpu") -> None:
        self.a1_gscale = torch.ones(1, device=device)
        self.a2_gscale = torch.full((1,), 0.5, device=device)
        self.unused = torch.empty(0, device=device)


def _registered(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]


# -- real HF models -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral", "gpt2"])
def test_hf_model_counts_match_state_dict_and_ties(kind, backend_case):
    backend, accel = backend_case
    model = build_tiny_model(kind)
    entries, aliases = expected_hf_entries(model)
    assert find_hidden_accel_tensors(model, backend) == []
    published = discover(model, backend)
    if not accel:
        assert published == []
        return
    assert len(published) == entries
    assert sum(len(p.aliases) for p in published) == aliases
    assert coverage_errors(published, _registered(model), [], backend.is_accel_tensor) == []


def test_gpt2_tied_embedding_published_once(mock_backend):
    model = build_tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    tied = [p for p in collect_module_tensors(model, mock_backend) if p.aliases]
    assert [(p.name, p.aliases) for p in tied] == [("transformer.wte.weight", ("lm_head.weight",))]
    assert len(model.state_dict()) == len(collect_module_tensors(model, mock_backend)) + 1


def test_mixtral_stacked_experts_published_whole(mock_backend):
    model = build_tiny_model("mixtral")
    published = {p.name: p.tensor for p in collect_module_tensors(model, mock_backend)}
    experts = [name for name in published if ".experts." in name]
    assert experts and all(published[name].dim() == 3 for name in experts)
    assert all(published[name].shape[0] == 4 for name in experts)  # num_experts


def test_hf_model_with_fp8_style_post_processing(mock_backend):
    """vLLM-style: scales created by post-load processing and a quant config object."""

    def post_process(model):
        for layer in model.model.layers:
            proj = layer.self_attn.q_proj
            proj.weight_scale = proj.weight.detach().abs().amax().reshape(1)
            layer.mlp.quant_method = FusedMoEQuantConfig()

    source, target = build_tiny_model("llama", seed=1), build_tiny_model("llama", seed=2)
    manifests = []
    for model in (source, target):
        with capture_tensor_attrs(model, mock_backend) as captured:
            post_process(model)
        assert captured == [f"model.layers.{i}.self_attn.q_proj.weight_scale" for i in range(2)]
        published = discover(model, mock_backend)
        adopted = [p.name for p in published if "._mx_" in p.name]
        assert len(adopted) == 2 * 2  # two scales per layer; the empty tensor is not adopted
        assert (
            coverage_errors(published, _registered(model), [], mock_backend.is_accel_tensor) == []
        )
        manifests.append(DiscoveryManifest.of(published))
    assert manifests[0] == manifests[1]  # same names and layouts, different weights


# -- random module trees ------------------------------------------------------------------------


@dataclass
class DataHolder:
    value: object
    other: object = None


class SlotHolder:
    __slots__ = ("value", "other")


class TreeBuilder:
    """Draws a random module tree; records the accelerator-reachable hidden tensors it plants."""

    def __init__(self, data: st.DataObject) -> None:
        self.draw = data.draw
        self.pool: list[torch.Tensor] = []
        self.finished: list[nn.Module] = []
        self.loose: list[torch.Tensor] = []  # hidden tensors the scan must reach

    def tensor(self) -> torch.Tensor:
        kinds = ["fresh", "zero", "meta"] + (["view", "tie", "bytes"] if self.pool else [])
        kind = self.draw(st.sampled_from(kinds))
        if kind == "zero":
            return torch.empty(0, self.draw(st.integers(0, 3)))
        shape = self.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        if kind == "meta":
            return torch.empty(shape, device="meta")
        if kind == "fresh":
            t = torch.randn(shape)
            t = t.t() if t.dim() == 2 and self.draw(st.booleans()) else t
        else:
            base = self.draw(st.sampled_from(self.pool))
            if kind == "tie":
                return base
            if kind == "bytes":  # reinterpret the whole storage as bytes
                base = torch.tensor([], dtype=torch.uint8).set_(base.untyped_storage())
            elems = base.untyped_storage().nbytes() // base.element_size()
            offset = self.draw(st.integers(0, elems - 1))
            stride = self.draw(st.integers(1, 3))
            n = self.draw(st.integers(1, max(1, (elems - 1 - offset) // stride + 1)))
            t = base.detach().as_strided((n,), (stride,), offset)
        self.pool.append(t)
        return t

    def hidden(self, depth: int) -> object:
        """A value sitting ``depth`` levels below a module attribute."""
        kind = self.draw(
            st.sampled_from(["tensor", "atom", "list", "dict", "data", "slots", "deep"])
        )
        if kind == "tensor" or depth >= 4:
            t = self.tensor()
            if depth <= MAX_HIDDEN_DEPTH:
                self.loose.append(t)
            return t
        if kind == "atom":
            return self.draw(st.sampled_from([None, 3, "x", 2.5, torch.float16]))
        if kind == "deep":  # a tensor just inside or just past the depth limit
            extra = self.draw(
                st.sampled_from([MAX_HIDDEN_DEPTH - depth, MAX_HIDDEN_DEPTH - depth + 1])
            )
            t = torch.randn(2)  # reachable only through this chain
            if depth + extra <= MAX_HIDDEN_DEPTH:
                self.loose.append(t)
            for _ in range(extra):
                t = [t]
            return t
        # elements of a list or dict sit one level down; in a holder's list, two
        below = depth + (2 if kind in ("data", "slots") else 1)
        children = [self.hidden(below) for _ in range(self.draw(st.integers(0, 3)))]
        if kind == "list":
            return children if self.draw(st.booleans()) else tuple(children)
        if kind == "dict":
            keys = [f"k{i}" if i % 2 else (torch.float16, i) for i in range(len(children))]
            d = dict(zip(keys, children, strict=True))
            d["self"] = d  # a cycle
            return d
        holder = DataHolder(children) if kind == "data" else SlotHolder()
        holder.value = children
        holder.other = holder  # a cycle
        return holder

    def module(self, depth: int) -> nn.Module:
        m = nn.Module()
        for i in range(self.draw(st.integers(0, 3))):
            m.register_parameter(f"p{i}", nn.Parameter(self.tensor(), requires_grad=False))
        for i in range(self.draw(st.integers(0, 2))):
            m.register_buffer(f"b{i}", self.tensor())
        for i in range(self.draw(st.integers(0, 2))):
            object.__setattr__(m, f"h{i}", self.hidden(0))
        for i in range(self.draw(st.integers(0, 2 if depth < 2 else 0))):
            reuse = self.finished and self.draw(st.booleans())
            m.add_module(
                f"c{i}",
                self.draw(st.sampled_from(self.finished)) if reuse else self.module(depth + 1),
            )
        self.finished.append(m)
        return m


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_reachable_accelerator_byte_is_published_exactly_once(data, backend_case):
    backend, accel = backend_case
    builder = TreeBuilder(data)
    root = builder.module(0)
    published = discover(root, backend)
    assert (
        coverage_errors(published, _registered(root), builder.loose, backend.is_accel_tensor) == []
    )
    if not accel:
        assert published == []
    assert adopt_hidden_tensors(root, backend) == []  # idempotent
    again = collect_module_tensors(root, backend)
    assert DiscoveryManifest.of(again) == DiscoveryManifest.of(published)


# -- scenario and benchmark ---------------------------------------------------------------------


def test_scenario_passes_and_reports_counts(tmp_path):
    results = scenario.run(tmp_path, quick=True)
    assert [r.name for r in results] == [
        "discovery/synthetic",
        *(f"discovery/{kind}" for kind in MODEL_BUILDERS),  # every tiny family
    ]
    assert all(r.passed for r in results), [r.detail for r in results]
    assert (
        results[0].detail
        == f"synthetic: {SyntheticConfig(layers=2).published()} tensors, 5 aliases"
    )
    assert results[-1].detail == "gpt2: 28 tensors, 1 aliases"


def test_scenario_fails_when_discovery_misses_hidden_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(scenario, "discover", lambda m, b=None: collect_module_tensors(m, b))
    synthetic = scenario.run(tmp_path, quick=True)[0]
    assert not synthetic.passed and "elements not covered" in synthetic.detail
    assert any("entries published, expected" in e for e in synthetic.details["errors"])


def test_bench_quick_reports_both_goals(tmp_path):
    from mx_sim.bench import discovery as bench

    (result,) = bench.run(tmp_path, quick=True)
    assert set(result.goals) == {"us_per_tensor_5k", "time_ratio_10k_over_5k"}
    assert result.metrics["tensors_5k"] > 4_000 and result.metrics["us_per_tensor_5k"] > 0
    assert isinstance(result.met, bool)


# -- two processes compare what they discovered -------------------------------------------------


def _publish_manifest(store_path: str, layers: int) -> None:
    store = torch.distributed.FileStore(store_path, 2)
    model = build_synthetic_model(SyntheticConfig(layers=layers))
    store.set("manifest", DiscoveryManifest.of(discover(model, CpuMockBackend())).to_json())


@pytest.mark.multiprocess
@pytest.mark.xdist_group("discovery")
@pytest.mark.timeout(60)
def test_two_processes_discover_the_same_manifest(tmp_path, monkeypatch):
    import datetime

    ctx = torch.multiprocessing.get_context("spawn")
    store_path = str(tmp_path / "store")
    child = ctx.Process(target=_publish_manifest, args=(store_path, 3))
    monkeypatch.setenv("PYTHONHASHSEED", "random")  # the child must not share our hash order
    child.start()
    try:
        store = torch.distributed.FileStore(store_path, 2)
        store.set_timeout(datetime.timedelta(seconds=45))
        theirs = DiscoveryManifest.from_json(store.get("manifest"))
        ours = DiscoveryManifest.of(
            discover(build_synthetic_model(SyntheticConfig(layers=3)), CpuMockBackend())
        )
        assert theirs == ours and theirs.digest() == ours.digest()
        smaller = build_synthetic_model(SyntheticConfig(layers=2))
        assert DiscoveryManifest.of(discover(smaller, CpuMockBackend())).digest() != theirs.digest()
        child.join(timeout=15)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        child.join(timeout=5)


# -- CUDA (skipped without a GPU) ---------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_backend_publishes_only_cuda_tensors():
    model = build_tiny_model("gpt2").cuda()
    model.register_buffer("host_only", torch.ones(3))  # stays on the CPU
    model.transformer.h[0].attn.quant_method = FusedMoEQuantConfig("cuda")
    model.transformer.h[0].attn.quant_method.a2_gscale = torch.ones(1)  # a CPU one: not adopted
    cuda = CudaBackend()
    published = discover(model, cuda)
    assert published and all(p.tensor.is_cuda for p in published)
    assert "host_only" not in [p.name for p in published]
    adopted = [p.name for p in published if "_mx_" in p.name]
    assert adopted == ["transformer.h.0.attn._mx_quant_method_a1_gscale"]
    assert coverage_errors(published, _registered(model), [], cuda.is_accel_tensor) == []


@pytest.mark.gpu
def test_cuda_storage_view_and_capture():
    cuda = CudaBackend()
    layer = nn.Linear(4, 4).cuda()
    layer.register_buffer("nc", torch.randn(3, 5, device="cuda").t())
    with capture_tensor_attrs(layer, cuda) as captured:
        layer.weight_scale = torch.ones(1, device="cuda")
        layer.host_scale = torch.ones(1)
    assert captured == ["weight_scale"] and "host_scale" in layer.__dict__
    published = {p.name: p for p in collect_module_tensors(layer, cuda)}
    assert list(published) == ["weight", "bias", "nc.__storage", "weight_scale"]
    view = published["nc.__storage"].tensor
    assert view.is_cuda and view.dtype == torch.uint8 and view.nbytes == 60
