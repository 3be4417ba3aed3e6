"""Hidden accelerator tensors: the scan, adoption as buffers, and setattr capture."""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from mx_reference.discovery import (
    MAX_HIDDEN_DEPTH,
    adopt_hidden_tensors,
    capture_tensor_attrs,
    collect_module_tensors,
    find_hidden_accel_tensors,
)


class Plain:
    """A plain object: attributes given as keywords."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


class Slotted:
    __slots__ = ("scale", "unset", "other")


class SlottedChild(Slotted):
    __slots__ = "extra"


@dataclass
class QuantConfig:
    a1_gscale: torch.Tensor
    extras: dict = field(default_factory=dict)


def _found(module, backend) -> list[tuple[str, str]]:
    return [(h.owner, h.path) for h in find_hidden_accel_tensors(module, backend)]


def _layer_with_quant_method() -> nn.Module:
    layer = nn.Linear(2, 2)
    layer.quant_method = Plain(a1_gscale=torch.ones(1), a2_gscale=torch.full((1,), 2.0), n=3)
    return layer


def test_scan_finds_tensors_on_plain_objects(backend_case):
    backend, accel = backend_case
    expected = [("", "quant_method.a1_gscale"), ("", "quant_method.a2_gscale")]
    assert _found(_layer_with_quant_method(), backend) == (expected if accel else [])


def test_scan_follows_containers_dataclasses_slots_and_nested_objects(mock_backend):
    m = nn.Module()
    m.child = nn.Module()
    slotted = SlottedChild()
    slotted.scale, slotted.extra = torch.ones(1), [torch.ones(2)]
    m.child.state = Plain(
        cfg=QuantConfig(torch.ones(1), {"w": (torch.ones(1), "x")}),
        by_dtype={(torch.float16, 3): torch.ones(1), 7: torch.ones(1), None: torch.ones(1)},
        by_object={object(): torch.ones(1)},
        slots=slotted,
        inner=Plain(deeper=Plain(t=torch.ones(3))),
    )
    m.bare = [torch.ones(1)]
    object.__setattr__(m, "loose", torch.ones(2))  # a bare tensor attribute, not registered
    assert _found(m, mock_backend) == [
        ("", "bare[0]"),
        ("", "loose"),
        ("child", "state.cfg.a1_gscale"),
        ("child", "state.cfg.extras['w'][0]"),
        ("child", "state.by_dtype[(torch.float16, 3)]"),
        ("child", "state.by_dtype[7]"),
        ("child", "state.by_dtype[None]"),
        ("child", "state.by_object[#0]"),
        ("child", "state.slots.scale"),
        ("child", "state.slots.extra[0]"),
        ("child", "state.inner.deeper.t"),
    ]


def test_scan_skips_zero_size_sets_dunder_names_and_registered_tensors(mock_backend):
    m = nn.Linear(2, 2)
    m.holder = Plain(empty=torch.empty(0), tagged={torch.ones(1)}, __private=torch.ones(1))
    m.holder.__dict__["__dunder"] = torch.ones(1)
    assert _found(m, mock_backend) == []


def _chain(depth: int, leaf) -> object:
    """``leaf`` nested ``depth`` levels below the returned object (which sits at level 0)."""
    obj = leaf
    for _ in range(depth):
        obj = Plain(next=obj)
    return obj


@pytest.mark.parametrize("depth", [1, MAX_HIDDEN_DEPTH, MAX_HIDDEN_DEPTH + 1, 25])
def test_scan_depth_limit(depth, mock_backend):
    assert MAX_HIDDEN_DEPTH == 20  # as in ModelExpress: both ends must agree on what is found
    m = nn.Module()
    m.chain = _chain(depth, torch.ones(1))
    expected = [("", "chain" + ".next" * depth)] if depth <= MAX_HIDDEN_DEPTH else []
    assert _found(m, mock_backend) == expected


def test_object_first_seen_too_deep_is_walked_again_from_higher_up(mock_backend):
    shared = Plain(t=torch.ones(1))
    m = nn.Module()
    m.a = _chain(MAX_HIDDEN_DEPTH, shared)  # shared.t would be one level too deep here
    m.b = shared
    assert _found(m, mock_backend) == [("", "b.t")]


def test_scan_terminates_on_cycles_and_reports_each_tensor_once(mock_backend):
    t = torch.ones(2)
    node = Plain(t=t)
    node.me = node
    loop: list = [t]
    loop.append(loop)
    d: dict = {"t": t}
    d["d"] = d
    m = nn.Module()
    m.node, m.loop, m.d = node, loop, d
    assert _found(m, mock_backend) == [("", "node.t")]


def test_raising_attribute_skips_only_that_attribute(mock_backend):
    class Proxy:
        """Like transformers' _LazyModule proxies: every attribute access raises."""

        def __getattribute__(self, name):
            raise RuntimeError(f"lazy import of {name} failed")

    lazy_module = types.ModuleType("lazy")
    lazy_module.weights = torch.ones(1)  # a Python module object is never walked
    class_holder = type("Holder", (), {"scale": torch.ones(1)})  # nor is a class
    unregistered = nn.Linear(1, 1)
    m = nn.Module()
    m.state = Plain(before=torch.ones(1), proxy=Proxy(), mod=lazy_module, after=torch.ones(4))
    m.kinds = [class_holder, Proxy(), torch.ones(2)]
    m.state.unregistered = unregistered  # nn.Modules are not walked
    assert _found(m, mock_backend) == [("", "state.before"), ("", "state.after"), ("", "kinds[2]")]


def test_scan_survives_containers_mutated_while_scanned(mock_backend):
    class Mutator:
        def __init__(self, target):
            self.target = target

        @property
        def __class__(self):  # isinstance() reads this: code running in the middle of a scan
            if isinstance(self.target, list):
                self.target.append(torch.ones(9))
            else:
                self.target[len(self.target)] = torch.ones(9)
            return Mutator

    items: list = [torch.ones(1)]
    items += [Mutator(items), torch.ones(2)]
    table: dict = {"a": torch.ones(1)}
    table.update({"m": Mutator(table), "b": torch.ones(2)})
    m = nn.Module()
    m.items, m.table = items, table
    found = _found(m, mock_backend)
    assert found == [("", "items[0]"), ("", "items[2]"), ("", "table['a']"), ("", "table['b']")]
    assert len(items) > 3 and len(table) > 3  # the scan did mutate them


# -- adoption -----------------------------------------------------------------------------------


def test_adopt_registers_non_persistent_buffers(backend_case):
    backend, accel = backend_case
    layer = _layer_with_quant_method()
    state_keys = list(layer.state_dict())
    adopted = adopt_hidden_tensors(layer, backend)
    if not accel:
        assert adopted == [] and list(layer.named_buffers()) == []
        return
    assert adopted == ["_mx_quant_method_a1_gscale", "_mx_quant_method_a2_gscale"]
    assert list(layer.state_dict()) == state_keys
    assert layer._mx_quant_method_a1_gscale is layer.quant_method.a1_gscale
    names = [p.name for p in collect_module_tensors(layer, backend)]
    assert names == ["weight", "bias", *adopted]


def test_adopt_is_idempotent(mock_backend):
    layer = _layer_with_quant_method()
    assert len(adopt_hidden_tensors(layer, mock_backend)) == 2
    before = [n for n, _ in layer.named_buffers()]
    assert adopt_hidden_tensors(layer, mock_backend) == []
    assert [n for n, _ in layer.named_buffers()] == before


def test_adopt_registers_on_the_owning_submodule(mock_backend):
    root = nn.Module()
    root.block = nn.Module()
    root.block.attn = _layer_with_quant_method()
    adopted = adopt_hidden_tensors(root, mock_backend)
    assert adopted == [
        "block.attn._mx_quant_method_a1_gscale",
        "block.attn._mx_quant_method_a2_gscale",
    ]
    assert "_mx_quant_method_a1_gscale" in root.block.attn._buffers


def test_adopted_buffer_is_the_hidden_tensor_so_writes_reach_its_holder(mock_backend):
    layer = _layer_with_quant_method()
    adopt_hidden_tensors(layer, mock_backend)
    with torch.no_grad():
        layer.get_buffer("_mx_quant_method_a1_gscale").fill_(7.0)
    assert layer.quant_method.a1_gscale.item() == 7.0


def test_adopt_skips_bytes_already_registered(mock_backend):
    base = torch.arange(16, dtype=torch.float32)
    nc = torch.zeros(3, 4).t()
    m = nn.Linear(2, 2)
    m.register_buffer("base", base)
    m.register_buffer("nc", nc)
    m.refs = Plain(
        same=m.weight,  # a registered Parameter
        offset_view=base[4:8],  # inside a registered tensor
        into_nc=nc.t()[0],  # in a storage published whole
    )
    assert adopt_hidden_tensors(m, mock_backend) == []


def test_adopt_keeps_a_larger_tensor_whose_view_is_registered(mock_backend):
    base = torch.arange(16, dtype=torch.float32)
    m = nn.Module()
    m.register_buffer("head", base[:4])
    m.holder = Plain(full=base)
    assert adopt_hidden_tensors(m, mock_backend) == ["_mx_holder_full"]
    published = collect_module_tensors(m, mock_backend)
    assert [(p.name, p.aliases) for p in published] == [("_mx_holder_full", ("head",))]


def test_adopted_names_are_escaped_and_collisions_suffixed(mock_backend):
    m = nn.Module()
    m.cfg = {"k.0": torch.ones(1), "k[0]": torch.ones(1), "k 0": torch.ones(1)}
    m._mx_cfg_k_0_2 = "taken"  # an existing attribute with a candidate name
    adopted = adopt_hidden_tensors(m, mock_backend)
    assert adopted == ["_mx_cfg_k_0", "_mx_cfg_k_0_1", "_mx_cfg_k_0_3"]
    assert m._mx_cfg_k_0_2 == "taken"


def test_adopted_names_are_deterministic_across_builds(mock_backend):
    def build():
        m = nn.Module()
        m.cache = {(torch.bfloat16, 2): torch.ones(1), object(): torch.ones(2)}
        return adopt_hidden_tensors(m, mock_backend)

    assert build() == build() == ["_mx_cache_torch_bfloat16_2", "_mx_cache_1"]


# -- capture ------------------------------------------------------------------------------------


def test_capture_promotes_bare_accelerator_tensors(backend_case):
    backend, accel = backend_case
    root = nn.Module()
    root.layer = nn.Linear(2, 2)
    state_keys = list(root.state_dict())
    with capture_tensor_attrs(root, backend) as captured:
        root.layer.weight_scale = torch.ones(1)
    assert isinstance(root.layer.weight_scale, torch.Tensor)
    if accel:
        assert captured == ["layer.weight_scale"]
        assert "weight_scale" in root.layer._buffers
        assert "weight_scale" not in root.layer.__dict__
    else:
        assert captured == [] and "weight_scale" in root.layer.__dict__
    assert list(root.state_dict()) == state_keys


def test_capture_replaces_an_existing_plain_attribute(mock_backend):
    layer = nn.Linear(2, 2)
    layer.k_scale = 1.0
    with capture_tensor_attrs(layer, mock_backend):
        layer.k_scale = torch.ones(1)
    assert "k_scale" in layer._buffers and "k_scale" not in layer.__dict__


def test_capture_leaves_parameters_buffers_submodules_and_class_attributes_alone(mock_backend):
    class WithProperty(nn.Linear):
        @property
        def scale(self):
            return self._scale

        @scale.setter
        def scale(self, value):
            object.__setattr__(self, "_scale", value)

    layer = WithProperty(2, 2)
    layer.register_buffer("running", torch.zeros(2))
    layer.sub = nn.Identity()
    new_buffer = torch.ones(2)
    with capture_tensor_attrs(layer, mock_backend) as captured:
        layer.extra = nn.Parameter(torch.ones(1))  # registered as a parameter by torch
        layer.running = new_buffer  # replaces the buffer
        layer.scale = torch.ones(1)  # the property setter runs
        with pytest.raises(TypeError, match="cannot assign"):
            layer.sub = torch.ones(1)
    assert captured == []
    assert "extra" in layer._parameters and layer.running is new_buffer
    assert "_scale" in layer.__dict__ and "scale" not in layer._buffers


def test_capture_affects_only_the_given_module_tree(mock_backend):
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    with capture_tensor_attrs(model, mock_backend) as captured:
        other.scale = torch.ones(1)
        fresh = nn.Linear(1, 1)  # created inside the context: not part of the tree on entry
        fresh.scale = torch.ones(1)
        model.scale = torch.ones(1)
    assert captured == ["scale"]
    assert "scale" in other.__dict__ and "scale" in fresh.__dict__


def test_capture_restores_setattr_also_on_exceptions(mock_backend):
    original = nn.Module.__setattr__
    layer = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="post-processing failed"):
        with capture_tensor_attrs(layer, mock_backend):
            assert nn.Module.__setattr__ is not original
            raise RuntimeError("post-processing failed")
    assert nn.Module.__setattr__ is original
    layer.after = torch.ones(1)
    assert "after" in layer.__dict__
