"""Refit data-plane benchmarks (benchmark 1, NIXL vs ``copy_``, lives in ``transport``).

2. Warm vs cold cycle: a warm cycle registers nothing, allocates nothing, and spends <= 2 % of
   its time on setup (alloc + register). Dynamo PR #10901's GPU figures: 0.392 s -> 0.215 s.
3. Translate time / pull time (warm cycles): goal <= 0.25.
4. Wall time of an end-to-end refit with 8 trainer ranks and 8 receiver ranks (reported).
5. Sharded vs full receivers, a TP4 replica from TP2 trainers: each sharded rank pulls its
   shard (<= 1.2 / 4 of the model; repeated norms) with no all-gather, and with
   ``min_span_bytes`` (fewer descriptors, some bytes twice) its warm cycle is no slower than a
   full-model rank's.

Writes ``refit.json`` and ``refit_phases.png`` (stacked per-phase seconds per cycle).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mx_reference.refit.planner import TargetLayout
from mx_reference.refit.receiver import CycleTiming
from mx_reference.refit.shards import ShardedRefitReceiver
from mx_sim.cluster.topology import TopologySpec
from mx_sim.conformance.sharded_adapter import cut, vllm_layout
from mx_sim.fixtures import TinyModelSpec, version_model
from mx_sim.plots import stacked_bars
from mx_sim.refit.multiprocess import run_topology
from mx_sim.refit.rig import RefitRig, Replica, RigConfig
from mx_sim.report import BenchResult

STACKED = ("discover", "plan", "alloc", "register", "pull", "translate", "verify", "apply")
# about 50 MB of float32 weights: large enough that moving bytes dominates a warm cycle
FULL = TinyModelSpec(
    vocab_size=4096, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
    num_kv_heads=4,
)  # fmt: skip
QUICK = TinyModelSpec()
WIDE = TinyModelSpec(num_heads=8, num_kv_heads=8, hidden_size=128, intermediate_size=256)


def rig_cycles(model: TinyModelSpec, cycles: int, trainer_tp: int) -> list[CycleTiming]:
    rig = RefitRig(RigConfig(model_spec=model, trainer_tp=trainer_tp))
    try:
        return [rig.cycle(v) for v in range(1, cycles + 1)]
    finally:
        rig.close()


def warm_vs_cold(timings: list[CycleTiming]) -> BenchResult:
    cold, warm = timings[0], timings[1:]
    warm_total = statistics.median(t.total for t in warm)
    setup_share = max((t.alloc + t.register) / t.total for t in warm)
    metrics = {
        "cold_total_s": cold.total,
        "warm_total_s": warm_total,
        "warm_over_cold": warm_total / cold.total,
        "cold_registrations": cold.registrations,
        "cold_bytes_allocated": cold.bytes_allocated,
        "warm_registrations": max(t.registrations for t in warm),
        "warm_bytes_allocated": max(t.bytes_allocated for t in warm),
        "warm_setup_share": setup_share,
    }
    met = (
        metrics["warm_registrations"] == 0
        and metrics["warm_bytes_allocated"] == 0
        and setup_share <= 0.02
    )
    return BenchResult(
        "refit warm vs cold cycle",
        metrics,
        goals={
            "warm_registrations": "== 0",
            "warm_bytes_allocated": "== 0",
            "warm_setup_share": "<= 0.02 of the cycle (Dynamo PR #10901 on GPU: 0.392 s -> 0.215 s)",
        },
        met=met,
    )


def translate_over_pull(matched: list[CycleTiming], mixed: list[CycleTiming]) -> BenchResult:
    def ratio(timings: list[CycleTiming]) -> float:
        return statistics.median(t.translate / t.pull for t in timings[1:])

    metrics = {
        "ratio_matched_tp1_tp1": ratio(matched),
        "ratio_mixed_tp2_tp1": ratio(mixed),
        "translate_s_mixed": statistics.median(t.translate for t in mixed[1:]),
        "pull_s_mixed": statistics.median(t.pull for t in mixed[1:]),
        "bytes_pulled": mixed[1].bytes_pulled,
    }
    return BenchResult(
        "refit translate / pull",
        metrics,
        goals={"ratio_mixed_tp2_tp1": "<= 0.25", "ratio_matched_tp1_tp1": "<= 0.25"},
        met=max(metrics["ratio_matched_tp1_tp1"], metrics["ratio_mixed_tp2_tp1"]) <= 0.25,
        notes="the simulated pull is a local shared-memory copy, as fast as any copy translate "
        "makes; q, k and v reach apply as views, row-parallel pieces at mixed TP are still "
        "copied out of scratch",
    )


def end_to_end() -> BenchResult:
    spec = TopologySpec(trainer_tp=8, inference_tp=8)
    result = run_topology(spec, "llama", cycles=3, model_spec=WIDE, deadline_s=300)
    per_cycle = (
        [max(cs[i]["total"] for cs in result.receiver_cycles()) for i in range(3)]
        if result.passed
        else []
    )
    metrics = {"wall_s": result.seconds, "ranks": spec.world_size, "passed": float(result.passed)}
    metrics.update({f"cycle{i + 1}_slowest_receiver_s": s for i, s in enumerate(per_cycle)})
    return BenchResult(
        f"refit end to end {spec.label()} (2 cores)",
        metrics,
        goals={"wall_s": "reported (no goal)", "passed": "== 1"},
        met=result.passed,
        notes="; ".join(result.errors[:3]),
    )


SPAN_BYTES = 64 * 1024  # the scratch mode: strided spans shorter than this read whole shards


def replica_cycles(
    model: TinyModelSpec, cycles: int, sharded: bool, min_span_bytes: int = 0
) -> list[list[CycleTiming]]:
    """TP2 trainers -> a TP4 replica of threads; per cycle, every rank's timing."""
    tp = 4
    with RefitRig(RigConfig(model_spec=model, trainer_tp=2)) as rig, Replica(tp) as replica:
        full = version_model("llama", model, 0)
        params = {n: p.detach() for n, p in full.named_parameters()}

        def receiver(r: int):
            target, group = TargetLayout(tp_size=tp, tp_rank=r), replica.groups[r]
            if not sharded:
                return rig.new_receiver(
                    version_model("llama", model, 0), target=target, group=group
                )
            layout = vllm_layout(dict(full.named_parameters()), full.config, tp, r)
            local = {n: cut(params, parts).clone() for n, parts in layout.items()}
            return rig.new_receiver(
                full, make=ShardedRefitReceiver, target=target, group=group, layout=layout,
                local=local, backend=rig.backend, min_span_bytes=min_span_bytes,
            )  # fmt: skip

        receivers = replica.map(receiver)
        out = []
        for v in range(1, cycles + 1):
            rig.publish(v)
            out.append(replica.map(lambda r: receivers[r].refit(v)))  # noqa: B023
        return out


def sharded_vs_full(model: TinyModelSpec, cycles: int) -> BenchResult:
    model_bytes = sum(
        p.numel() * p.element_size() for p in version_model("llama", model, 0).parameters()
    )
    runs = {
        "sharded": replica_cycles(model, cycles, True),
        "scratch": replica_cycles(model, cycles, True, SPAN_BYTES),
        "full": replica_cycles(model, cycles, False),
    }

    def warm_s(mode: str) -> float:  # the slowest rank of each warm cycle, median over cycles
        return statistics.median(max(t.total for t in ranks) for ranks in runs[mode][1:])

    def pull(mode: str) -> float:
        return max(t.bytes_pulled for t in runs[mode][-1]) / model_bytes

    metrics = {
        "model_mbytes": model_bytes / 1e6,
        "sharded_rank_pull_over_model": pull("sharded"),
        "scratch_rank_pull_over_model": pull("scratch"),
        "full_rank_pull_over_model": pull("full"),
        "sharded_warm_s": warm_s("sharded"),
        "scratch_warm_s": warm_s("scratch"),
        "full_warm_s": warm_s("full"),
        "sharded_over_full": warm_s("sharded") / warm_s("full"),
        "scratch_over_full": warm_s("scratch") / warm_s("full"),
    }
    met = metrics["sharded_rank_pull_over_model"] <= 1.2 / 4 and metrics["scratch_over_full"] <= 1
    return BenchResult(
        "refit sharded vs full TP2->TP4 replica",
        metrics,
        goals={
            "sharded_rank_pull_over_model": "<= 0.3 (1.2 / T: exact spans pull the shard)",
            "scratch_over_full": "<= 1 (min_span_bytes=64 KiB: no all-gather, no full apply)",
        },
        met=met,
        notes="ranks as threads of one process on 2 cores; the full path pulls its slice too, "
        "then all-gathers, merges and applies the whole model on every rank. A sharded rank "
        "pulls exactly its bytes: at TP2 -> TP4 its row-parallel columns are one span per row "
        "(about 4,100 descriptors of 1 KiB a rank here), which costs the simulated transport "
        "and UCX more than the full path's whole-shard reads plus its gather; with "
        "min_span_bytes such pieces read their whole source shard into scratch instead",
    )


def plot(timings: list[CycleTiming], path: Path) -> None:
    stacked_bars(
        path,
        "refit phases per cycle (receiver, TP2 -> TP1)",
        [f"cycle {t.version}" for t in timings],
        {phase: [getattr(t, phase) for t in timings] for phase in STACKED},
    )


def run(out_dir: Path, quick: bool) -> list[BenchResult]:
    out_dir.mkdir(parents=True, exist_ok=True)
    model, cycles = (QUICK, 3) if quick else (FULL, 5)
    timings = rig_cycles(model, cycles, trainer_tp=2)
    matched = rig_cycles(model, cycles, trainer_tp=1)
    results = [
        warm_vs_cold(timings),
        translate_over_pull(matched, timings),
        sharded_vs_full(model, cycles),
    ]
    if not quick:
        results.append(end_to_end())
    plot(timings, out_dir / "refit_phases.png")
    (out_dir / "refit.json").write_text(
        json.dumps(
            {"results": [r.to_json() for r in results], "cycles": [t.to_json() for t in timings]},
            indent=2,
        )
    )
    return results
