"""Conformance checks: graphs.*

The adapter captures and replays through ``capture_graph`` / ``replay_graph`` (CUDA graphs, or
the CPU simulated graph under the mock backend). Outputs are compared with eager runs of the
same model in plain torch, input state with a copy taken before capture, and refitted outputs
with an independently built model holding the new weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mx_reference import adapter as caps
from mx_reference.graphs import InputAddressError
from mx_sim.conformance.catalog import check
from mx_sim.fixtures import build_tiny_model
from mx_sim.scenarios.graphs import llama_prefill

RTOL = ATOL = 1e-5  # replays may pick other kernels than eager on CUDA


def _prefill(adapter, model: torch.nn.Module):
    """Graph-safe llama prefill ``(inputs, forward, eager)`` on the adapter's device."""
    inputs, forward = llama_prefill(model)
    device = adapter.backend.torch_device()
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def eager() -> torch.Tensor:  # (1, seq, vocab) logits
        with torch.no_grad():
            return forward(inputs).clone()

    return inputs, forward, eager


def _expect_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        worst = (got - want).abs().max().item()
        raise AssertionError(f"{what}: replay differs from eager by up to {worst:.3g}")


@check("graphs.replay_matches_eager", requires=(caps.CUDA_GRAPHS,))
def replay_matches_eager(adapter) -> None:
    """Capture and replay of a tiny HF Llama equal eager, also after new tokens are written in."""
    model = adapter.build_model("llama")
    inputs, forward, eager = _prefill(adapter, model)
    output = adapter.capture_graph("prefill", forward, inputs)
    first = eager()
    _expect_close(adapter.replay_graph("prefill", inputs), first, "same tokens")
    ids = inputs["input_ids"]
    ids.copy_((ids * 3 + 1) % model.config.vocab_size)  # new tokens, same memory
    replayed = adapter.replay_graph("prefill", inputs)
    _expect_close(replayed, eager(), "new tokens")
    if torch.allclose(replayed, first, rtol=RTOL, atol=ATOL):
        raise AssertionError("replay with new tokens returned the old logits")
    if replayed is not output:
        raise AssertionError("replay must rewrite the output object the capture returned")


def _spec_decode_inputs(device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "hidden": torch.linspace(-1, 1, 32, device=device).reshape(4, 8),
        "kv_lens": torch.tensor([5, 7, 9, 11], device=device),
        "position_ids": torch.arange(4, device=device),
    }


def _spec_decode_forward(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Like spec-decode pre-processing (MTP): advances kv_lens and positions in place. (4, 8)"""
    inputs["kv_lens"].add_(1)
    inputs["position_ids"].add_(1)
    return inputs["hidden"] * inputs["kv_lens"].unsqueeze(1) + inputs["position_ids"].unsqueeze(1)


def _undo_spec_decode(inputs: dict[str, torch.Tensor]) -> None:
    inputs["kv_lens"].sub_(1)
    inputs["position_ids"].sub_(1)


@check("graphs.postprocess_restores_inputs", requires=(caps.CUDA_GRAPHS,))
def postprocess_restores_inputs(adapter) -> None:
    """Capture runs the postprocess after every warmup and the capture: inputs end as they began."""
    inputs = _spec_decode_inputs(adapter.backend.torch_device())
    before = {k: v.clone() for k, v in inputs.items()}
    adapter.capture_graph("spec-decode", _spec_decode_forward, inputs, _undo_spec_decode)
    for name, t in inputs.items():
        if not torch.equal(t, before[name]):
            raise AssertionError(
                f"input {name!r} is {t.tolist()} after capture, {before[name].tolist()} before: "
                "the postprocess did not run after each warmup and the capture"
            )


@dataclass
class _AttnMetadata:
    seq_lens: torch.Tensor  # (batch,)
    kv_lens: torch.Tensor  # (batch,)


def _decode_step(inputs: dict[str, Any]) -> torch.Tensor:
    """(batch, 8) hidden in, (batch, 8) out; reads both metadata tensors."""
    meta = inputs["attn_metadata"]
    return inputs["hidden"] * meta.seq_lens.unsqueeze(1) + meta.kv_lens.unsqueeze(1)


def _expect_rejected(adapter, key: str, inputs: dict, path: str) -> None:
    try:
        adapter.replay_graph(key, inputs)
    except InputAddressError as exc:
        if path not in str(exc):
            raise AssertionError(f"InputAddressError does not name {path}: {exc}") from exc
    except Exception as exc:
        raise AssertionError(
            f"replay with {path} moved raised {type(exc).__name__}, not InputAddressError"
        ) from exc
    else:
        raise AssertionError(f"replay with {path} moved to new memory was not rejected")


@check("graphs.moved_input_rejected", requires=(caps.CUDA_GRAPHS,))
def moved_input_rejected(adapter) -> None:
    """Replay with an input that moved is rejected with InputAddressError naming its path."""
    device = adapter.backend.torch_device()
    meta = _AttnMetadata(torch.tensor([2.0, 3.0], device=device), torch.ones(2, device=device))
    inputs: dict[str, Any] = {"hidden": torch.ones(2, 8, device=device), "attn_metadata": meta}
    adapter.capture_graph("decode", _decode_step, inputs)
    kv_lens = meta.kv_lens
    meta.kv_lens = kv_lens.clone()  # same values, new memory: the graph would read the old
    _expect_rejected(adapter, "decode", inputs, "attn_metadata.kv_lens")
    meta.kv_lens = kv_lens
    _expect_rejected(adapter, "decode", {**inputs, "hidden": inputs["hidden"].clone()}, "hidden")
    kv_lens.copy_(torch.tensor([0.5, 0.25]))  # an in-place update is what replays see
    got = adapter.replay_graph("decode", inputs)
    _expect_close(got, _decode_step(inputs), "after the rejected replays")


@check("graphs.refit_in_place", requires=(caps.CUDA_GRAPHS,))
def refit_in_place(adapter) -> None:
    """After load_weights, replaying the captured graph gives the new weights' logits."""
    model = adapter.build_model("llama", seed=0)
    inputs, forward, eager = _prefill(adapter, model)
    adapter.capture_graph("prefill", forward, inputs)
    old = eager()
    new_model = build_tiny_model("llama", seed=1).to(adapter.backend.torch_device())
    with torch.no_grad():
        expected = new_model(**inputs, use_cache=False).logits
    adapter.load_weights(model, new_model.named_parameters())
    got = adapter.replay_graph("prefill", inputs)
    _expect_close(got, expected, "after refit")
    if torch.allclose(got, old, rtol=RTOL, atol=ATOL):
        raise AssertionError("replay after refit returned the old weights' logits")
