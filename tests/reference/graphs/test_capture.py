"""Capture runner and the CPU simulated graph: staging, warmup hygiene, validation, refit."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mx_reference.backends import CudaBackend
from mx_reference.graphs import (
    GraphCaptureError,
    GraphRunner,
    InputAddressError,
    RunnerConfig,
    SimulatedGraph,
    SimulatedMemoryError,
    module_address_ledger,
)
from mx_sim.cpu_mock import CpuMockBackend


@dataclass
class AttnMeta:
    seq_lens: torch.Tensor
    kv_lens: torch.Tensor


def forward(inputs):
    """Shape (n, 4) in, (n, 4) out; reads metadata so a stale metadata tensor shows."""
    meta = inputs["attn_metadata"]
    return inputs["x"] * 2 + meta.seq_lens.sum()


def make_runner(validation="first", **cfg) -> GraphRunner:
    config = RunnerConfig(static_inputs={"x": 0}, max_batch=8, validation=validation, **cfg)
    return GraphRunner(config, backend=CpuMockBackend())


def make_inputs(n=4, fill=1.0):
    meta = AttnMeta(seq_lens=torch.tensor([1.0, 2.0]), kv_lens=torch.tensor([5, 6]))
    return {"x": torch.full((n, 4), fill), "attn_metadata": meta}


# ---- the simulated graph ------------------------------------------------------------------


def test_simulated_replay_reads_captured_storage_not_new_arguments():
    x = torch.ones(3)
    holder = {"x": x}
    graph = SimulatedGraph()
    out = graph.capture(lambda: holder["x"] * 2 + 1)
    assert torch.equal(out, torch.full((3,), 3.0))
    x.fill_(5)
    graph.replay()
    assert torch.equal(out, torch.full((3,), 11.0))  # replay overwrote the captured output
    holder["x"] = torch.full((3,), 100.0)  # a new tensor the graph never sees
    graph.replay()
    assert torch.equal(out, torch.full((3,), 11.0))  # the stale-data bug, reproduced
    assert graph.num_ops == 2


def test_cpu_side_effects_are_not_replayed():
    state = {"calls": 0}
    acc = torch.zeros(1)

    def fn():
        state["calls"] += 1  # Python work: runs at capture only (pytorch#114844)
        acc.add_(1)  # device work: replayed
        return acc

    graph = SimulatedGraph()
    graph.capture(fn)
    graph.replay()
    graph.replay()
    assert state == {"calls": 1}
    assert acc.item() == 3


def test_host_sync_and_concurrent_capture_raise():
    t = torch.ones(2)
    with pytest.raises(GraphCaptureError, match="copies device data to the host"):
        SimulatedGraph().capture(lambda: t.sum().item())
    outer = SimulatedGraph()
    with pytest.raises(GraphCaptureError, match="already capturing"):
        outer.capture(lambda: SimulatedGraph().capture(lambda: t + 1))
    graph = SimulatedGraph()
    graph.capture(lambda: t + 1)  # state was reset after the failures
    with pytest.raises(GraphCaptureError, match="already captured"):
        graph.capture(lambda: t + 1)


def test_replay_after_input_freed_or_resized_is_an_illegal_access():
    holder = {"x": torch.ones(4)}
    graph = SimulatedGraph()
    graph.capture(lambda: holder["x"].view(2, 2) + 1)  # even a view does not keep it alive
    graph.replay()
    holder["x"] = None
    gc.collect()
    with pytest.raises(SimulatedMemoryError, match="was freed"):
        graph.replay()
    y = torch.ones(4)
    graph = SimulatedGraph()
    graph.capture(lambda: y * 2)
    y.resize_(1 << 16)
    with pytest.raises(SimulatedMemoryError, match="reallocated"):
        graph.replay()


# ---- capture: warmups and postprocess -----------------------------------------------------


def spec_decode_forward(inputs):
    """Like TensorRT-LLM's _preprocess_inputs: bumps kv_lens in place inside forward."""
    inputs["attn_metadata"].kv_lens.add_(inputs["offsets"])
    return inputs["x"] + inputs["attn_metadata"].kv_lens.sum()


def undo_offsets(inputs):
    inputs["attn_metadata"].kv_lens.sub_(inputs["offsets"])


def test_without_postprocess_the_mutation_accumulates_three_times():
    inputs = {**make_inputs(), "offsets": torch.tensor([1, 1])}
    before = inputs["attn_metadata"].kv_lens.clone()
    make_runner().capture("g", spec_decode_forward, inputs, warmup_steps=2)
    assert torch.equal(inputs["attn_metadata"].kv_lens, before + 3)


def test_postprocess_restores_inputs_after_warmups_and_capture():
    inputs = {**make_inputs(), "offsets": torch.tensor([1, 1])}
    before = inputs["attn_metadata"].kv_lens.clone()
    calls = []

    def postprocess(i):
        calls.append(i["attn_metadata"].kv_lens.clone())
        undo_offsets(i)

    runner = make_runner()
    runner.capture("g", spec_decode_forward, inputs, postprocess_fn=postprocess, warmup_steps=2)
    assert torch.equal(inputs["attn_metadata"].kv_lens, before)
    assert len(calls) == 3 and all(torch.equal(c, before + 1) for c in calls)
    out = runner.replay("g", inputs)  # replay applies the in-graph update, as CUDA does
    assert torch.equal(inputs["attn_metadata"].kv_lens, before + 1)
    assert torch.equal(out, inputs["x"] + (before + 1).sum())


# ---- static buffers and replay copies -----------------------------------------------------


def test_static_buffers_sized_for_largest_batch_and_shared():
    runner = make_runner()
    big, small = make_inputs(8), make_inputs(2)
    small["attn_metadata"] = big["attn_metadata"]
    runner.capture(8, forward, big)
    runner.capture(2, forward, small)
    x8, x2 = runner.captured_inputs(8)["x"], runner.captured_inputs(2)["x"]
    assert x8.shape == (8, 4) and x2.shape == (2, 4)
    assert x8.data_ptr() == x2.data_ptr()  # one buffer, sliced
    assert x8.data_ptr() != big["x"].data_ptr()
    with pytest.raises(ValueError, match="more than RunnerConfig.max_batch=8"):
        runner.capture(9, forward, make_inputs(9))


def test_replay_copies_new_inputs_and_matches_eager():
    runner = make_runner()
    inputs = make_inputs(4)
    runner.capture("g", forward, inputs)
    new = {**inputs, "x": torch.randn(4, 4)}
    out = runner.replay("g", new)
    assert torch.equal(out, forward(new))
    assert not torch.equal(out, forward(inputs))


class CopyCounter(TorchDispatchMode):
    def __init__(self, dst_ptr):
        super().__init__()
        self.dst_ptr, self.copies = dst_ptr, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default and args[0].data_ptr() == self.dst_ptr:
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_replay_skips_copy_when_input_already_at_static_address():
    runner = make_runner()
    inputs = make_inputs(4)
    runner.capture("g", forward, inputs)
    static = runner.captured_inputs("g")["x"]
    counts = []
    for x in (static, static.view(4, 4), torch.ones(4, 4)):
        with CopyCounter(static.data_ptr()) as counter:
            runner.replay("g", {**inputs, "x": x})
        counts.append(counter.copies)
    assert counts == [0, 0, 1]


def test_short_input_rejected_or_padded_explicitly():
    inputs = make_inputs(4)
    runner = make_runner()
    runner.capture("g", forward, inputs)
    short = {**inputs, "x": torch.full((3, 4), 9.0)}
    with pytest.raises(ValueError, match=r"'x' has 3 rows along dim 0 .* captured for 4"):
        runner.replay("g", short)
    with pytest.raises(ValueError, match="'x' has 5 rows"):
        runner.replay("g", {**inputs, "x": torch.ones(5, 4)})
    with pytest.raises(ValueError, match=r"'x' is torch.int64"):
        runner.replay("g", {**inputs, "x": torch.ones(4, 4, dtype=torch.long)})
    padded = make_runner(pad_short_inputs=True, pad_value=-1.0)
    padded.capture("g", forward, inputs)
    out = padded.replay("g", short)
    expected_x = torch.cat([short["x"], torch.full((1, 4), -1.0)])
    assert torch.equal(out, forward({**inputs, "x": expected_x}))


def test_metadata_identity_checked_and_failed_replay_leaves_buffers_untouched():
    runner = make_runner()
    inputs = make_inputs(4)
    runner.capture("g", forward, inputs)
    static = runner.captured_inputs("g")["x"]
    before = static.clone()
    clone_meta = AttnMeta(**vars(inputs["attn_metadata"]))
    with pytest.raises(ValueError, match="inputs\\['attn_metadata'\\] is not the metadata object"):
        runner.replay("g", {"x": torch.zeros(4, 4), "attn_metadata": clone_meta})
    assert torch.equal(static, before)
    inputs["attn_metadata"].seq_lens = inputs["attn_metadata"].seq_lens.clone()
    with pytest.raises(InputAddressError):
        runner.replay("g", {**inputs, "x": torch.zeros(4, 4)})
    assert torch.equal(static, before)


# ---- validation modes: the uncopied-input bug ---------------------------------------------


def rebind_seq_lens(inputs, values) -> torch.Tensor:
    """The bug: build a fresh metadata tensor instead of writing into the captured one.

    Returns the captured tensor, which its builder still owns (so the memory stays valid).
    """
    captured = inputs["attn_metadata"].seq_lens
    inputs["attn_metadata"].seq_lens = torch.tensor(values)
    return captured


def test_off_mode_replays_stale_metadata_silently():
    runner = make_runner("off")
    inputs = make_inputs(4)
    runner.capture("g", forward, inputs)
    _owned_by_builder = rebind_seq_lens(inputs, [10.0, 20.0])
    out = runner.replay("g", inputs)
    assert not torch.equal(out, forward(inputs))  # silent wrong answer
    assert torch.equal(out, inputs["x"] * 2 + 3.0)  # computed from the captured seq_lens


def test_first_mode_catches_it_with_the_path():
    runner = make_runner("first")
    inputs = make_inputs(4)
    runner.capture("g", forward, inputs)
    old_ptr = inputs["attn_metadata"].seq_lens.data_ptr()
    rebind_seq_lens(inputs, [10.0, 20.0])
    new_ptr = inputs["attn_metadata"].seq_lens.data_ptr()
    with pytest.raises(InputAddressError) as err:
        runner.replay("g", inputs)
    assert [p for p, _, _ in err.value.diff.changed] == ["kwargs.attn_metadata.seq_lens"]
    assert f"kwargs.attn_metadata.seq_lens: {old_ptr:#x} -> {new_ptr:#x}" in str(err.value)


def test_first_mode_checks_each_graph_once_and_always_mode_every_replay():
    for mode, raises_late in (("first", False), ("always", True)):
        runner = make_runner(mode)
        inputs = make_inputs(4)
        runner.capture("g", forward, inputs)
        runner.replay("g", inputs)  # validated, passes
        _owned_by_builder = rebind_seq_lens(inputs, [10.0, 20.0])
        if raises_late:
            with pytest.raises(InputAddressError):
                runner.replay("g", inputs)
        else:
            runner.replay("g", inputs)
        with pytest.raises(InputAddressError):  # explicit validation always checks
            runner.validate("g", inputs)


def test_config_and_key_errors():
    with pytest.raises(ValueError, match="validation must be one of"):
        RunnerConfig(validation="sometimes")
    with pytest.raises(ValueError, match="max_batch"):
        RunnerConfig(max_batch=0)
    runner = make_runner()
    inputs = make_inputs(4)
    runner.capture("g", forward, inputs)
    with pytest.raises(ValueError, match="already captured"):
        runner.capture("g", forward, inputs)
    with pytest.raises(ValueError, match=r"static input\(s\) \['x'\] missing"):
        runner.capture("h", forward, {"attn_metadata": inputs["attn_metadata"]})
    with pytest.raises(KeyError, match="no graph captured under 'h'"):
        runner.replay("h", inputs)
    runner.clear()
    assert runner.keys == []
    runner.capture("g", forward, inputs)


def test_backend_routes_to_simulated_graph_on_cpu():
    runner = make_runner()
    runner.capture("g", forward, make_inputs(4))
    assert isinstance(runner.graph("g"), SimulatedGraph)
    assert GraphRunner().backend == CudaBackend()


# ---- refit interplay ----------------------------------------------------------------------


def mlp_runner(validation="first"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    config = RunnerConfig(static_inputs={"x": 0}, max_batch=4, validation=validation)
    runner = GraphRunner(config, backend=CpuMockBackend(), module=model)
    inputs = {"x": torch.randn(4, 4)}
    runner.capture("g", lambda i: model(i["x"]), inputs)
    return runner, model, inputs


def test_inplace_refit_keeps_addresses_and_replay_sees_new_weights():
    runner, model, inputs = mlp_runner("always")
    before_out = runner.replay("g", inputs).clone()
    ledger = module_address_ledger(model, backend=CpuMockBackend())
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(p * 0.5 + 0.1)
    assert module_address_ledger(model, backend=CpuMockBackend()) == ledger
    out = runner.replay("g", inputs)
    with torch.no_grad():
        assert torch.allclose(out, model(inputs["x"]))
    assert not torch.allclose(out, before_out)


def test_rebinding_refit_is_detected():
    runner, model, inputs = mlp_runner("first")
    model[0].weight.data = model[0].weight.detach() * 0.5
    with pytest.raises(InputAddressError) as err:
        runner.replay("g", inputs)
    assert [p for p, _, _ in err.value.diff.changed] == ["module.0.weight"]
    off, model, inputs = mlp_runner("off")
    model[0].weight.data = model[0].weight.detach() * 0.5
    gc.collect()
    with pytest.raises(SimulatedMemoryError):  # the old weights are gone: CUDA reads garbage
        off.replay("g", inputs)


# ---- CUDA ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_capture_replay_and_validation():
    config = RunnerConfig(static_inputs={"x": 0}, max_batch=8)
    runner = GraphRunner(config, backend=CudaBackend())
    meta = AttnMeta(seq_lens=torch.tensor([1.0, 2.0], device="cuda"), kv_lens=torch.ones(2))
    inputs = {"x": torch.ones(8, 4, device="cuda"), "attn_metadata": meta}
    runner.capture(8, forward, inputs)
    runner.capture(4, forward, {**inputs, "x": torch.ones(4, 4, device="cuda")})
    new = {**inputs, "x": torch.randn(4, 4, device="cuda")}
    out = runner.replay(4, new)
    torch.cuda.synchronize()
    assert torch.equal(out, forward(new))
    assert type(runner.graph(4)).__name__ == "_CudaGraph"
    meta.seq_lens = meta.seq_lens.clone()
    with pytest.raises(InputAddressError, match="kwargs.attn_metadata.seq_lens"):
        runner.replay(8, inputs)


@pytest.mark.gpu
def test_cuda_capture_with_a_postprocess_leaves_mutated_inputs_as_they_were():
    """A CUDA capture records the forward's in-place writes without running them, so only the
    warmups are undone: the inputs end as they began (they were one step behind before)."""
    runner = GraphRunner(RunnerConfig(), backend=CudaBackend())
    kv_lens = torch.tensor([5, 7, 9, 11], device="cuda")

    def forward(inputs):
        inputs["kv_lens"].add_(1)  # spec-decode pre-processing advances it in place
        return inputs["kv_lens"] * 2

    out = runner.capture("spec", forward, {"kv_lens": kv_lens}, lambda i: i["kv_lens"].sub_(1))
    torch.cuda.synchronize()
    assert kv_lens.tolist() == [5, 7, 9, 11]
    runner.replay("spec", {"kv_lens": kv_lens})
    torch.cuda.synchronize()
    assert kv_lens.tolist() == [6, 8, 10, 12] and out.tolist() == [12, 16, 20, 24]
