"""Address ledger, diff and liveness: unit tests and hypothesis properties."""

from __future__ import annotations

import copy
import gc
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mx_reference.backends import CudaBackend
from mx_reference.graphs import (
    DeadInputError,
    InputAddressError,
    LivenessTracker,
    TensorAddress,
    check_ledger,
    diff_ledgers,
    extract_tensor_addresses,
    module_address_ledger,
)
from mx_sim.cpu_mock import CpuMockBackend

CPU = CpuMockBackend()
Pair = namedtuple("Pair", ["a", "b"])


@dataclass
class Meta:
    x: object
    y: object


class Slotted:
    __slots__ = ("a", "b", "_hidden")

    def __init__(self, a=None, b=None):
        self.a = a
        self.b = b
        self._hidden = torch.ones(1)


class SlotsAndDict:
    __slots__ = ("s", "__dict__")


class Box:
    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def ledger(*args, **kwargs):
    return extract_tensor_addresses(args, kwargs, backend=CPU)


# ---- traversal and paths ------------------------------------------------------------------


def test_path_grammar_matches_vllm_style():
    qsl = torch.arange(5)
    layers = [Box(query_start_loc=torch.arange(3)) for _ in range(16)]
    layers[14].query_start_loc = qsl
    meta = Box(layers=layers)
    led = extract_tensor_addresses((torch.ones(2),), {"attn_metadata": meta}, backend=CPU)
    assert list(led)[0] == "args.0"
    assert led["kwargs.attn_metadata.layers.14.query_start_loc"].data_ptr == qsl.data_ptr()
    assert len(led) == 17


def test_metadata_root_and_order_is_deterministic():
    meta = Meta(x=torch.ones(1), y={"b": torch.ones(1), "a": torch.ones(1)})
    led = extract_tensor_addresses((), {}, meta, backend=CPU)
    assert list(led) == ["metadata.x", "metadata.y.b", "metadata.y.a"]  # insertion order


def test_containers_namedtuple_dataclass_slots_and_keys():
    t = [torch.full((i + 1,), float(i)) for i in range(6)]
    slots_dict = SlotsAndDict()
    slots_dict.s = t[4]
    slots_dict.d = t[5]
    obj = {
        "pair": Pair(a=t[0], b=7),
        "meta": Meta(x=t[1], y=None),
        "slots": Slotted(a=t[2]),
        "both": slots_dict,
        3: t[3],
    }
    assert list(ledger(obj=obj)) == [
        "kwargs.obj.pair.a",
        "kwargs.obj.meta.x",
        "kwargs.obj.slots.a",
        "kwargs.obj.both.s",
        "kwargs.obj.both.d",
        "kwargs.obj.[3]",
    ]


def test_unset_slot_private_names_and_properties_are_skipped_without_getters():
    calls = []

    class WithProperty:
        def __init__(self):
            self.visible = torch.ones(1)
            self._private = torch.ones(1)

        @property
        def computed(self):
            calls.append(1)
            return torch.ones(1)

    slotted = Slotted(a=torch.ones(1))
    del slotted.b
    led = ledger(p=WithProperty(), s=slotted)
    assert list(led) == ["kwargs.p.visible", "kwargs.s.a"]
    assert calls == []


def test_cycles_are_cut_and_shared_objects_reported_at_every_path():
    shared = Box(t=torch.ones(2))
    a = Box(shared=shared)
    a.me = a
    cyclic: list = [shared]
    cyclic.append(cyclic)
    led = ledger(a=a, l=cyclic, again=shared)
    assert list(led) == ["kwargs.a.shared.t", "kwargs.l.0.t", "kwargs.again.t"]


def test_views_are_not_deduplicated():
    base = torch.arange(10.0)
    led = ledger(base, base[2:], base)
    assert led["args.1"].storage_ptr == led["args.0"].storage_ptr
    assert led["args.1"].data_ptr != led["args.0"].data_ptr
    assert led["args.2"] == led["args.0"]


def test_colliding_paths_raise_value_error():
    with pytest.raises(ValueError, match="kwargs.a.b"):
        ledger(a={"b": torch.ones(1), "b.": None}, **{"a.b": torch.ones(1)})


def test_backend_policy(backend_case):
    backend, tensors_are_accel = backend_case
    led = extract_tensor_addresses((torch.ones(1),), {"m": Box(t=torch.ones(1))}, backend=backend)
    assert list(led) == (["args.0", "kwargs.m.t"] if tensors_are_accel else [])


def test_default_backend_is_cuda_and_ignores_cpu():
    assert extract_tensor_addresses((torch.ones(1),)) == {}
    assert not CudaBackend().is_accel_tensor(torch.ones(1))


# ---- diff ----------------------------------------------------------------------------------


def test_diff_reports_every_kind_of_change_readably():
    a, b, c = torch.ones(4), torch.ones(4), torch.ones(4)
    old = ledger(a=a, b=b, c=c, gone=torch.ones(1))
    moved = a.clone()
    new = ledger(a=moved, b=b.view(2, 2), c=c.to(torch.float16), extra=torch.ones(1))
    diff = diff_ledgers(old, new)
    assert diff.missing == ("kwargs.gone",)
    assert diff.added == ("kwargs.extra",)
    assert [p for p, _, _ in diff.changed] == ["kwargs.a", "kwargs.c"]
    assert diff.changed[0] == ("kwargs.a", a.data_ptr(), moved.data_ptr())
    assert [p for p, _, _ in diff.shape_changed] == ["kwargs.b"]
    assert [p for p, _, _ in diff.dtype_changed] == ["kwargs.c"]
    with pytest.raises(InputAddressError) as err:
        check_ledger("decode-8", old, new)
    text = str(err.value)
    assert text.startswith("Input addresses for graph 'decode-8' are different during replay.")
    assert f"    kwargs.a: {a.data_ptr():#x} -> {moved.data_ptr():#x}" in text
    assert "  Missing paths:\n    kwargs.gone" in text
    assert "  Added paths:\n    kwargs.extra" in text
    assert "kwargs.b: (4,) stride (1,) -> (2, 2) stride (2, 1)" in text
    assert "kwargs.c: torch.float32 on cpu -> torch.float16 on cpu" in text
    assert err.value.diff == diff
    assert not isinstance(err.value, AssertionError)


def test_long_diff_is_capped():
    tensors = [torch.ones(1) for _ in range(30)]
    old = ledger(*tensors)
    new = ledger(*[t.clone() for t in tensors])
    diff = diff_ledgers(old, new)
    assert len(diff.changed) == 30
    assert "... and 10 more" in diff.format("t")


def test_equal_ledgers_do_not_raise():
    t = torch.ones(3)
    assert not diff_ledgers(ledger(t), ledger(t))
    check_ledger("k", ledger(t), ledger(t))


# ---- hypothesis: random nested structures ------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9]{0,3}", fullmatch=True)
tensors = st.integers(1, 3).map(lambda n: torch.zeros(n))


def _self_cycle_list(items: list) -> list:
    items.append(items)
    return items


def _self_cycle_box(attrs: dict) -> Box:
    box = Box(**attrs)
    box.me = box
    return box


def _slotted(ab: tuple) -> Slotted:
    return Slotted(*ab)


def _children(inner):
    return st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.lists(inner, max_size=3).map(_self_cycle_list),
        st.dictionaries(names, inner, max_size=3),
        st.tuples(inner, inner).map(lambda ab: Pair(*ab)),
        st.builds(Meta, inner, inner),
        st.tuples(inner, inner).map(_slotted),
        st.dictionaries(names, inner, max_size=3).map(lambda d: Box(**d)),
        st.dictionaries(names.filter(lambda n: n != "me"), inner, max_size=3).map(_self_cycle_box),
    )


structures = st.recursive(
    st.one_of(tensors, st.integers(), st.none(), st.text(max_size=3)), _children, max_leaves=12
)


def _tensors_in(obj) -> list[torch.Tensor]:
    found: dict[int, torch.Tensor] = {}

    def visit(x, seen):
        if isinstance(x, torch.Tensor):
            found[id(x)] = x
        elif id(x) not in seen:
            seen.add(id(x))
            children = x.values() if isinstance(x, dict) else x
            if isinstance(x, (Box, Meta)):
                children = vars(x).values()
            elif isinstance(x, Slotted):
                children = [x.a, x.b]
            if isinstance(x, (list, tuple, dict, Box, Meta, Slotted)):
                for child in children:
                    visit(child, seen)

    visit(obj, set())
    return list(found.values())


@given(structures)
def test_identical_addresses_never_raise(obj):
    before = ledger(obj)
    rebuilt = copy.deepcopy(obj, memo={id(t): t for t in _tensors_in(obj)})  # new containers
    after = ledger(rebuilt)
    assert list(after) == list(before)
    check_ledger("k", before, after)
    check_ledger("k", before, ledger(obj))


@given(structures, st.data())
def test_changed_address_is_reported_at_its_path(obj, data):
    before = ledger(obj)
    if not before:
        return
    path = data.draw(st.sampled_from(sorted(before)))
    target = next(t for t in _tensors_in(obj) if t.data_ptr() == before[path].data_ptr)
    expected = {p for p, a in before.items() if a.data_ptr == target.data_ptr()}
    target.set_(target.clone())  # same tensor object, new storage: a rebind
    diff = diff_ledgers(before, ledger(obj))
    assert {p for p, _, _ in diff.changed} == expected
    assert path in expected
    assert not diff.missing and not diff.added
    with pytest.raises(InputAddressError, match=path.replace(".", r"\.")):
        check_ledger("k", before, ledger(obj))


# ---- module ledger -------------------------------------------------------------------------


def test_module_ledger_inplace_refit_is_stable_and_rebind_is_detected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_buffer("scale", torch.ones(4))
    before = module_address_ledger(model, backend=CPU)
    assert list(before) == ["scale", "0.weight", "0.bias", "1.weight", "1.bias"]
    old = model[0].weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(p * 2 + 1)
    assert not torch.equal(model[0].weight, old)
    assert not diff_ledgers(before, module_address_ledger(model, backend=CPU))
    model[0].weight.data = torch.zeros(4, 4)
    diff = diff_ledgers(before, module_address_ledger(model, backend=CPU))
    assert [p for p, _, _ in diff.changed] == ["0.weight"]


def test_module_ledger_lists_tied_weights_under_each_name():
    emb = torch.nn.Embedding(8, 4)
    head = torch.nn.Linear(4, 8, bias=False)
    head.weight = emb.weight
    led = module_address_ledger(torch.nn.ModuleDict({"emb": emb, "head": head}), backend=CPU)
    assert led["emb.weight"] == led["head.weight"]
    assert module_address_ledger(head) == {}  # default CUDA backend: CPU weights ignored


# ---- liveness ------------------------------------------------------------------------------


def test_alive_inputs_pass_and_freed_input_is_dead():
    a, b = torch.ones(4), torch.ones(4)
    tracker = LivenessTracker([("a", a), ("b", b)])
    tracker.check("g")
    ptr = b.untyped_storage().data_ptr()
    del b
    gc.collect()
    dead = tracker.dead()
    assert [(d.path, d.reason) for d in dead] == [("b", "freed")]
    with pytest.raises(DeadInputError, match=rf"1 dead tensor(?s:.*)b \(storage {ptr:#x} freed\)"):
        tracker.check("g")


def test_set_and_resize_larger_are_dead():
    a, b, keep = torch.ones(4), torch.ones(4), torch.ones(4)
    tracker = LivenessTracker([("a", a), ("b", b), ("keep", keep)])
    a.set_(torch.zeros(4))
    b.resize_(1 << 16)
    dead = {d.path: d.reason for d in tracker.dead()}
    assert dead["a"] == "freed"
    assert dead["b"].startswith("moved to 0x")
    assert "keep" not in dead


def test_view_lives_while_base_lives():
    base = torch.ones(8)
    view = base[2:4]
    tracker = LivenessTracker([("v", view)])
    del view
    gc.collect()
    assert tracker.dead() == []
    del base
    gc.collect()
    assert [d.path for d in tracker.dead()] == ["v"]


def test_empty_and_pool_tensors_are_not_tracked():
    pooled = torch.ones(4)
    tracker = LivenessTracker(
        [("empty", torch.empty(0)), ("pooled", pooled), ("mine", torch.ones(1))],
        pool_owns={pooled.untyped_storage().data_ptr()}.__contains__,
    )
    assert tracker.paths == ["mine"]


def test_dead_listing_is_capped_at_five():
    tracker = LivenessTracker([(f"t{i}", torch.ones(1)) for i in range(8)])  # all freed at once
    gc.collect()
    with pytest.raises(DeadInputError) as err:
        tracker.check("g")
    assert len(err.value.dead) == 8
    assert "8 dead tensor(s)" in str(err.value) and "... and 3 more" in str(err.value)


def test_tensor_address_of_records_layout():
    t = torch.zeros(2, 3, dtype=torch.float16)[:, 1:]
    addr = TensorAddress.of(t)
    assert addr.shape == (2, 2) and addr.stride == (3, 1) and addr.dtype == torch.float16
    assert addr.data_ptr == addr.storage_ptr + 2
