"""Graph capture across a refit: a tiny real HF Llama on the CPU simulated graph.

1. capture the forward, replay with new tokens: logits match eager;
2. refit in place (``param.data.copy_``), replay: logits match eager with the new weights and the
   model's address ledger is unchanged;
3. refit by rebinding ``.data``: validation names the moved parameter, and an unvalidated replay
   reads memory the graph no longer owns.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from mx_reference.graphs import (
    GraphRunner,
    InputAddressError,
    RunnerConfig,
    SimulatedMemoryError,
    diff_ledgers,
    module_address_ledger,
)
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.fixtures import build_tiny_model, fixed_prompt
from mx_sim.report import ScenarioResult

SEQ_LEN = 8


def llama_prefill(model: torch.nn.Module, seq_len: int = SEQ_LEN):
    """Graph-safe prefill inputs and forward for a tiny HF model: ``(inputs, forward)``.

    A 4-D causal mask and explicit positions: HF's own mask code calls ``.item()``, which a
    capture forbids (``GraphCaptureError``, as on CUDA).
    """
    inputs = {
        "input_ids": fixed_prompt(model.config.vocab_size, seq_len),
        "position_ids": torch.arange(seq_len).unsqueeze(0),
        "attention_mask": torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None, None],
    }

    def forward(i):  # (1, seq_len) token ids -> (1, seq_len, vocab) logits
        return model(**i, use_cache=False).logits

    return inputs, forward


def prefill_runner(model: torch.nn.Module, validation: str, seq_len: int = SEQ_LEN) -> GraphRunner:
    """A runner on the CPU mock whose static inputs are the prefill tokens and positions."""
    config = RunnerConfig(
        static_inputs={"input_ids": 1, "position_ids": 1}, max_batch=seq_len, validation=validation
    )
    return GraphRunner(config, backend=CpuMockBackend(), module=model)


def _setup(validation: str):
    model = build_tiny_model("llama")
    inputs, forward = llama_prefill(model)
    return model, prefill_runner(model, validation), inputs, forward


def _eager(forward, inputs) -> torch.Tensor:
    with torch.no_grad():
        return forward(inputs)


def _new_tokens(inputs: dict, step: int, vocab: int) -> dict:
    return {**inputs, "input_ids": (inputs["input_ids"] * (step + 2) + 1) % vocab}


def capture_and_refit(cycles: int) -> list[ScenarioResult]:
    model, runner, inputs, forward = _setup("always")
    vocab = model.config.vocab_size
    start = time.perf_counter()
    runner.capture("prefill", forward, inputs)
    capture_s = time.perf_counter() - start
    step_inputs = _new_tokens(inputs, 0, vocab)
    logits = runner.replay("prefill", step_inputs)
    replay_ok = torch.allclose(logits, _eager(forward, step_inputs), atol=1e-5)
    rows = [
        ScenarioResult(
            "graphs/capture-replay",
            passed=replay_ok,
            detail=f"llama prefill {SEQ_LEN} tokens; replay == eager: {replay_ok}",
            details={"capture_s": capture_s, "ops": runner.graph("prefill").num_ops},
        )
    ]

    before = module_address_ledger(model, backend=runner.backend)
    failures = []
    for cycle in range(cycles):
        previous = logits.clone()
        with torch.no_grad():
            for p in model.parameters():
                p.data.copy_(p * 0.9 + 0.01 * (cycle + 1))
        diff = diff_ledgers(before, module_address_ledger(model, backend=runner.backend))
        step_inputs = _new_tokens(inputs, cycle + 1, vocab)
        logits = runner.replay("prefill", step_inputs)
        if diff:
            failures.append(f"cycle {cycle}: ledger moved ({len(diff.changed)} changed)")
        if not torch.allclose(logits, _eager(forward, step_inputs), atol=1e-5):
            failures.append(f"cycle {cycle}: replay != eager with new weights")
        if torch.allclose(logits, previous):
            failures.append(f"cycle {cycle}: logits did not change")
    rows.append(
        ScenarioResult(
            "graphs/inplace-refit",
            passed=not failures,
            detail="; ".join(failures)
            or f"{cycles} in-place refit(s): empty ledger diff, replay == eager",
            details={"params": len(before)},
        )
    )
    return rows


def rebinding_refit() -> ScenarioResult:
    model, runner, inputs, forward = _setup("first")
    runner.capture("prefill", forward, inputs)
    target = "model.layers.0.self_attn.q_proj.weight"
    weight = model.get_parameter(target)
    weight.data = weight.detach() * 0.9  # what a post-load .contiguous() or shuffle does
    try:
        runner.validate("prefill", inputs)
        detected = "not detected"
    except InputAddressError as exc:
        moved = [p for p, _, _ in exc.diff.changed]
        detected = "detected" if moved == [f"module.{target}"] else f"wrong paths {moved}"

    unvalidated = prefill_runner(model, "off")
    unvalidated.capture("prefill", forward, inputs)
    weight.data = weight.detach() * 0.9
    gc.collect()
    try:
        unvalidated.replay("prefill", inputs)
        off = "replayed silently"
    except SimulatedMemoryError:
        off = "illegal access"
    return ScenarioResult(
        "graphs/rebind-refit-detected",
        passed=detected == "detected" and off == "illegal access",
        detail=f".data rebind of {target}: validation {detected}; mode off: {off}",
    )


def run(out_dir: Path, quick: bool) -> list[ScenarioResult]:
    return [*capture_and_refit(cycles=1 if quick else 3), rebinding_refit()]
