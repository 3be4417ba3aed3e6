"""Discovery benchmark: per-tensor cost of ``discover`` (hidden scan, adoption, collection).

The model is the synthetic MoE of ``mx_sim.scenarios.discovery`` with 128 experts per layer
(Qwen3-30B-A3B publishes 18,867 tensors); the layer count sets the size. Goals: at most 10 µs per
tensor at 20k tensors, and linear: time at 40k over time at 20k at most 2.3.

Each size is timed best-of-N on one model after a first ``discover`` (which adopts the hidden
tensors; later calls repeat the same scan and find them covered), sizes interleaved. ``gc.collect()`` runs before
each repetition, the collector stays enabled: objects that survive a call (one record per
tensor) can trigger a full collection of the whole heap, which is part of the real cost.
"""

from __future__ import annotations

import gc
import pathlib
import time
from collections.abc import Callable

import torch

from mx_reference.discovery import (
    collect_module_tensors,
    discover,
    find_hidden_accel_tensors,
    iter_module_tensors,
)
from mx_sim.cpu_mock import CpuMockBackend
from mx_sim.report import BenchResult
from mx_sim.scenarios.discovery import SyntheticConfig, build_synthetic_model

EXPERTS = 128
MAX_US_PER_TENSOR = 10.0
MAX_SCALING = 2.3
BACKEND = CpuMockBackend()


def _model(target_tensors: int) -> tuple[torch.nn.Module, int]:
    """A synthetic model of about ``target_tensors`` tensors (after adoption) and its count."""
    per_layer = 3 * EXPERTS + 11  # registered names per layer once hidden tensors are adopted
    cfg = SyntheticConfig(layers=max(1, round(target_tensors / per_layer)), experts=EXPERTS)
    model = build_synthetic_model(cfg)
    discover(model, BACKEND)
    return model, sum(1 for _ in iter_module_tensors(model, BACKEND))


def _best_seconds(models: list[torch.nn.Module], fn: Callable, reps: int) -> list[float]:
    """Best-of-``reps`` seconds of ``fn(model)`` per model; sizes interleave so that load
    changes on a shared machine hit every size alike."""
    best = [float("inf")] * len(models)
    for _ in range(reps):
        for i, model in enumerate(models):
            gc.collect()
            start = time.perf_counter()
            fn(model, BACKEND)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def run(out_dir: pathlib.Path, quick: bool) -> list[BenchResult]:
    small, large = (5_000, 10_000) if quick else (20_000, 40_000)
    reps = 3 if quick else 7
    (a, n_a), (b, n_b) = _model(small), _model(large)
    t_a, t_b = _best_seconds([a, b], discover, reps)
    (scan_a,) = _best_seconds([a], find_hidden_accel_tensors, reps)
    (collect_a,) = _best_seconds([a], collect_module_tensors, reps)
    us_per_tensor = 1e6 * t_a / n_a
    scaling = t_b / t_a
    label = f"{small // 1000}k"
    metrics = {
        f"tensors_{label}": n_a,
        f"us_per_tensor_{label}": us_per_tensor,
        f"us_per_tensor_{large // 1000}k": 1e6 * t_b / n_b,
        f"time_ratio_{large // 1000}k_over_{label}": scaling,
        f"hidden_scan_us_per_tensor_{label}": 1e6 * scan_a / n_a,
        f"collect_us_per_tensor_{label}": 1e6 * collect_a / n_a,
    }
    goals = {
        f"us_per_tensor_{label}": f"<= {MAX_US_PER_TENSOR} µs per tensor (discover: adopt + collect)",
        f"time_ratio_{large // 1000}k_over_{label}": f"<= {MAX_SCALING} (linear in tensor count)",
    }
    return [
        BenchResult(
            name="discovery/synthetic_moe",
            metrics=metrics,
            goals=goals,
            met=us_per_tensor <= MAX_US_PER_TENSOR and scaling <= MAX_SCALING,
            notes=f"{EXPERTS} experts per layer, CPU mock backend, best of {reps}",
        )
    ]
