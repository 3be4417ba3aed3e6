"""Discovery of registered tensors: enumeration, dedup by storage extent, storage views, manifest."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mx_reference.backends import CudaBackend
from mx_reference.discovery import (
    DiscoveryManifest,
    PublishedTensor,
    adopt_hidden_tensors,
    capture_tensor_attrs,
    collect_module_tensors,
    discover,
    find_hidden_accel_tensors,
    iter_module_tensors,
    storage_view,
)
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.scenarios.discovery import coverage_errors


def _names(published: list[PublishedTensor]) -> list[tuple[str, tuple[str, ...]]]:
    return [(p.name, p.aliases) for p in published]


def _module(**tensors: torch.Tensor) -> nn.Module:
    """A module with the given buffers, registered in keyword order."""
    m = nn.Module()
    for name, t in tensors.items():
        m.register_buffer(name, t)
    return m


def _check_coverage(m: nn.Module, published: list[PublishedTensor], backend) -> None:
    named = [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]
    assert coverage_errors(published, named, [], backend.is_accel_tensor) == []


def test_iter_parameters_of_every_module_before_buffers(backend_case):
    backend, accel = backend_case
    root = nn.Module()
    root.register_buffer("rb", torch.zeros(2))
    root.child = nn.Linear(2, 2)
    root.child.register_buffer("cb", torch.ones(1))
    got = [(name, kind) for name, _, kind in iter_module_tensors(root, backend)]
    expected = [
        ("child.weight", "parameter"),
        ("child.bias", "parameter"),
        ("rb", "buffer"),
        ("child.cb", "buffer"),
    ]
    assert got == (expected if accel else [])


def test_iter_keeps_tied_names_and_skips_module_cycles(mock_backend):
    root = nn.Module()
    root.a = nn.Linear(2, 2, bias=False)
    root.b = nn.Module()
    root.b.shared = root.a  # a shared submodule: its weight has two names
    root.b.loop = root.b  # a module cycle
    names = [name for name, _, _ in iter_module_tensors(root, mock_backend)]
    assert names == ["a.weight", "b.shared.weight"]
    assert [n for n, _ in root.named_parameters()] == ["a.weight"]  # what torch would report


def test_collect_linear_publishes_the_module_tensors_themselves(backend_case):
    backend, accel = backend_case
    lin = nn.Linear(3, 2)
    published = collect_module_tensors(lin, backend)
    if not accel:
        assert published == []
        return
    assert _names(published) == [("weight", ()), ("bias", ())]
    assert published[0].tensor is lin.weight and published[1].tensor is lin.bias
    _check_coverage(lin, published, backend)


def test_tied_weights_published_once_under_the_first_name(backend_case):
    backend, accel = backend_case
    root = nn.Module()
    root.embed = nn.Embedding(8, 4)
    root.head = nn.Linear(4, 8, bias=False)
    root.head.weight = root.embed.weight
    published = collect_module_tensors(root, backend)
    assert _names(published) == ([("embed.weight", ("head.weight",))] if accel else [])


def test_smaller_view_seen_first_does_not_shadow_the_larger_tensor(backend_case):
    backend, accel = backend_case
    full = torch.arange(16, dtype=torch.float32)
    m = _module(head=full[:4], full=full)  # same start pointer, the smaller one first
    published = collect_module_tensors(m, backend)
    if not accel:
        assert published == []
        return
    assert _names(published) == [("full", ("head",))]
    assert published[0].tensor.nbytes == 64
    _check_coverage(m, published, backend)


def test_views_inside_a_tensor_become_its_aliases(mock_backend):
    full = torch.arange(12, dtype=torch.float32)
    m = _module(tail=full[8:], full=full, mid=full[4:6])
    assert _names(collect_module_tensors(m, mock_backend)) == [("full", ("tail", "mid"))]


def test_disjoint_slices_of_one_storage_are_published_separately(mock_backend):
    base = torch.arange(16, dtype=torch.float32)
    m = _module(hi=base[8:], lo=base[:8], lo_again=base[:8])
    published = collect_module_tensors(m, mock_backend)
    assert _names(published) == [("hi", ()), ("lo", ("lo_again",))]
    _check_coverage(m, published, mock_backend)


def test_overlap_no_tensor_spans_publishes_the_whole_storage(mock_backend):
    base = torch.arange(10, dtype=torch.float32)
    m = _module(left=base[:6], right=base[4:])
    published = collect_module_tensors(m, mock_backend)
    assert _names(published) == [("left.__storage", ("left", "right"))]
    assert published[0].tensor.nbytes == 40
    _check_coverage(m, published, mock_backend)


def test_non_contiguous_tensor_publishes_its_whole_storage(backend_case):
    backend, accel = backend_case
    m = _module(nc_view=torch.randn(4, 6).t())
    published = collect_module_tensors(m, backend)
    if not accel:
        assert published == []
        return
    assert _names(published) == [("nc_view.__storage", ("nc_view",))]
    view = published[0].tensor
    assert view.dtype == torch.uint8 and view.is_contiguous() and view.nbytes == 96
    assert view.data_ptr() == m.nc_view.data_ptr()


def test_contiguous_tensor_and_strided_view_of_one_storage_merge(mock_backend):
    # ModelExpress dedups the storage view by its pointer, which equals the contiguous tensor's
    # start pointer: the view was dropped and the bytes past the first tensor were lost.
    base = torch.arange(24, dtype=torch.float32)
    m = _module(first=base[:4], strided=base[::2])
    published = collect_module_tensors(m, mock_backend)
    assert _names(published) == [("strided.__storage", ("first", "strided"))]
    _check_coverage(m, published, mock_backend)


def test_storage_view_covers_the_whole_storage():
    t = torch.arange(16, dtype=torch.float32)
    view = storage_view(t[4:8])
    assert view.dtype == torch.uint8 and view.is_contiguous()
    assert view.nbytes == 64 and view.data_ptr() == t.data_ptr()
    assert storage_view(t.view(4, 4).t()).data_ptr() == t.data_ptr()


def test_zero_element_tensors_keep_their_names_and_are_not_deduplicated(backend_case):
    backend, accel = backend_case
    m = nn.Module()
    m.a = nn.Parameter(torch.empty(0))
    m.b = nn.Parameter(torch.empty(0, 3))
    m.w = nn.Parameter(torch.ones(2))
    published = collect_module_tensors(m, backend)
    assert _names(published) == ([("a", ()), ("b", ()), ("w", ())] if accel else [])


def test_entries_follow_first_seen_order_across_mixed_storages(mock_backend):
    base = torch.arange(8, dtype=torch.float32)
    m = _module(x=torch.ones(1), part=base[2:4], y=torch.empty(0), whole=base, z=torch.ones(1))
    assert _names(collect_module_tensors(m, mock_backend)) == [
        ("x", ()),
        ("whole", ("part",)),
        ("y", ()),
        ("z", ()),
    ]


def test_cuda_backend_never_publishes_a_cpu_tensor():
    m = nn.Linear(2, 2)
    m.quant = type("Quant", (), {})()
    m.quant.scale = torch.ones(2)
    assert discover(m, CudaBackend()) == []
    assert discover(m) == []  # None means CUDA
    assert [n for n, _ in m.named_buffers()] == []


def test_only_tensors_the_backend_accepts_are_published(mock_backend):
    m = _module(host=torch.ones(2), meta=torch.empty(3, device="meta"))
    m.quant = type("Quant", (), {})()
    m.quant.meta_scale = torch.empty(2, device="meta")
    assert _names(discover(m, mock_backend)) == [("host", ())]


@pytest.mark.parametrize(
    "call",
    [
        iter_module_tensors,
        collect_module_tensors,
        find_hidden_accel_tensors,
        adopt_hidden_tensors,
        discover,
        lambda x, b: capture_tensor_attrs(x, b).__enter__(),
    ],
)
@pytest.mark.parametrize("bad", [torch.ones(2), {"weight": torch.ones(2)}, None])
def test_non_module_argument_raises_type_error_naming_it(call, bad, mock_backend):
    with pytest.raises(
        TypeError, match=f"module must be a torch.nn.Module, got {type(bad).__name__}"
    ):
        call(bad, mock_backend)
    assert nn.Module.__setattr__ is nn.Module.__dict__["__setattr__"]


# -- manifest -----------------------------------------------------------------------------------


def _manifest_module() -> nn.Module:
    m = nn.Module()
    m.embed = nn.Embedding(4, 2)
    m.head = nn.Linear(2, 4, bias=False)
    m.head.weight = m.embed.weight
    base = torch.arange(12, dtype=torch.float16)
    m.register_buffer("window", base[2:6])
    m.register_buffer("nc", torch.zeros(2, 3).t())
    m.register_buffer("empty", torch.empty(0))
    return m


def test_manifest_records_describe_each_entry(mock_backend):
    manifest = DiscoveryManifest.of(collect_module_tensors(_manifest_module(), mock_backend))
    by_name = {r.name: r for r in manifest.records}
    assert list(by_name) == ["embed.weight", "window", "nc.__storage", "empty"]
    emb, window, nc, empty = by_name.values()
    assert (emb.shape, emb.dtype, emb.stride, emb.nbytes, emb.aliases) == (
        (4, 2),
        "float32",
        (2, 1),
        32,
        ("head.weight",),
    )
    assert (window.dtype, window.storage_offset, window.nbytes) == ("float16", 2, 8)
    assert (nc.shape, nc.dtype, nc.stride, nc.nbytes, nc.aliases) == (
        (24,),
        "uint8",
        (1,),
        24,
        ("nc",),
    )
    assert (empty.shape, empty.nbytes) == ((0,), 0)


def test_manifest_digest_and_json_are_deterministic(mock_backend):
    a = DiscoveryManifest.of(collect_module_tensors(_manifest_module(), mock_backend))
    b = DiscoveryManifest.of(collect_module_tensors(_manifest_module(), mock_backend))
    assert a == b and a.digest() == b.digest() and a.to_json() == b.to_json()
    assert DiscoveryManifest.from_json(a.to_json()) == a
    assert json.loads(a.to_json())["records"][0]["name"] == "embed.weight"


def test_manifest_digest_changes_with_names_and_aliases(mock_backend):
    m = _manifest_module()
    before = DiscoveryManifest.of(collect_module_tensors(m, mock_backend)).digest()
    m.head.weight = nn.Parameter(torch.ones(4, 2))  # untie
    untied = DiscoveryManifest.of(collect_module_tensors(m, mock_backend))
    assert untied.digest() != before
    assert [r.name for r in untied.records][:2] == ["embed.weight", "head.weight"]


@pytest.mark.parametrize(
    "text, field",
    [
        ('{"records": [{"name": 3}]}', "records[0].name"),
        ('{"records": [{"name": "w", "shape": ["x"]}]}', "records[0].shape[0]"),
        ('{"records": {}}', "records"),
        ("not json", "malformed"),
    ],
)
def test_manifest_from_json_rejects_bad_input_naming_the_field(text, field):
    with pytest.raises(ValueError, match=r"invalid discovery manifest") as info:
        DiscoveryManifest.from_json(text)
    assert field.lower() in str(info.value).lower()


# -- the oracle catches the known bugs ----------------------------------------------------------


def _pointer_dedup(module: nn.Module, backend) -> list[PublishedTensor]:
    """The ModelExpress rule: contiguous tensors dedup by start pointer, first seen wins."""
    seen: set[int] = set()
    out = []
    for name, t, _ in iter_module_tensors(module, backend):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append(PublishedTensor(name, t))
    return out


def test_oracle_flags_pointer_dedup_shadowing(mock_backend):
    full = torch.arange(16, dtype=torch.float32)
    m = _module(head=full[:4], full=full)
    named = list(m.named_buffers())
    assert (
        coverage_errors(
            collect_module_tensors(m, mock_backend), named, [], mock_backend.is_accel_tensor
        )
        == []
    )
    errors = coverage_errors(
        _pointer_dedup(m, mock_backend), named, [], mock_backend.is_accel_tensor
    )
    assert any("not covered" in e for e in errors) and any(
        "full: published 0 times" in e for e in errors
    )


def test_oracle_flags_double_registration_and_foreign_tensors():
    cuda = CudaBackend()
    t = torch.ones(4)
    twice = [PublishedTensor("a", t), PublishedTensor("b", t[1:])]
    errors = coverage_errors(twice, [("a", t), ("b", t[1:])], [], CpuMockBackend().is_accel_tensor)
    assert errors == ["a and b overlap: bytes registered twice"]
    cpu_under_cuda = coverage_errors(
        [PublishedTensor("a", t)], [("a", t)], [], cuda.is_accel_tensor
    )
    assert "a: published tensor is not a contiguous accelerator tensor" in cpu_under_cuda
    assert "a: published 1 times, expected 0" in cpu_under_cuda
