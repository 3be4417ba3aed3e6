"""The peers section of docs/performance.md, rendered from the ``peers.json`` that
:func:`mx_sim.bench.peers.run` wrote: the table of methods, the plot, where our refit's time
goes, how far each of issue 19's goals is, and the projection to an 8 GB model on 8 + 8 ranks.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from mx_sim.bench.peers import METHODS, PHASES, RSS_KEYS, size_label

Size = dict[str, Any]  # one model size of peers.json: its rows, one per case


def page_section(out_dir: Path, page: Path) -> str:
    """The peers table, plot and reading, from ``out_dir/peers.json`` ("" before a run)."""
    path = out_dir / "peers.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    sizes, rel = data["sizes"], os.path.relpath(out_dir, page.parent)
    cases = list(dict.fromkeys(r["case"] for s in sizes for r in s["rows"]))
    base = statistics.median(r["rss_base_mb"] for s in sizes for r in s["rows"] if r["verified"])
    head = " | ".join(
        f"{size_label(s['mib'])} s | x copy_ | RSS T / I | added T / I" for s in sizes
    )
    lines = [
        "## Weight-sync peers",
        "",
        "`mx-sim bench --only peers`: a warm update of an fp32 HF Llama from trainer processes "
        f"to inference processes, median of {data['config']['reps']}, the methods interleaved "
        "in one run, fresh processes each repetition, every tensor checked with `torch.equal` "
        "(FAILED: not timed). x copy_: over `copy_` of the whole model's bytes in one process. "
        "An inference TP over 1 is a vLLM-shaped sharded rank (fused QKV and gate/up), which "
        "pulls and holds its slices only. RSS: each process's peak in the warm update, trainer "
        "(T) / inference (I), the largest rank, over the bytes that rank holds; it counts the "
        f"~{base:.0f} MB a rank holds before any weights (torch, transformers, Megatron-Core), "
        f"added does not. Raw results: [`{rel}/peers.json`]({rel}/peers.json).",
        "",
        f"| method | {head} |",
        "|---|" + "---:|" * 4 * len(sizes),
    ]
    for case in cases:
        cells = []
        for s in sizes:
            r = next((r for r in s["rows"] if r["case"] == case), None)
            if r is None or not r["verified"]:
                cells.append(f"{'FAILED' if r else '—'} | | | ")
                continue
            rss = [f"{r[k]:.2f}" if r[k] is not None else "—" for k in RSS_KEYS]  # peak, added
            cells.append(f"{r['seconds']:.3f} | {r.get('x_copy', 0):.1f} | {rss[0]} / {rss[1]} | "
                         f"{rss[2]} / {rss[3]}")  # fmt: skip
        method, _, topology = case.partition(" ")
        name = METHODS[method] + (f", {topology}" if topology else "")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    reading = [*_reading(sizes), "", *_goals(sizes), "", *_projection(sizes)]
    return "\n".join([*lines, "", f"![peers]({rel}/peers.png)", "", *reading, ""])


def _rows(size: Size) -> dict[str, dict[str, Any]]:
    """A size's verified rows by case."""
    return {r["case"]: r for r in size["rows"] if "x_copy" in r}


def _reading(sizes: list[Size]) -> list[str]:
    """Where our refit's time goes, by the phases its ranks report."""
    lines = [
        "Our refit over NIXL at TP1->TP1 by phase (median s, x copy_). Publish copies each "
        "shard into the trainer's arena (snapshot mode) and publishes the manifest; the trainer "
        "then computes the XXH3-128 digests on a background thread while the receiver pulls "
        "(`PublisherConfig.sign_later`). Verify is the receiver's XXH3 of every byte it "
        "pulled, then the wait for the trainer's digests; apply copies into the model; the rest "
        "is discovery, planning, translation and the signals between the processes.",
        "",
        f"| size | {' | '.join(PHASES)} | rest | total |",
        "|---|" + "---:|" * (len(PHASES) + 2),
    ]
    for s in sizes:
        rows = _rows(s)
        if "refit_nixl" not in rows:
            continue
        ours, copy_s = rows["refit_nixl"], rows["copy"]["seconds"]
        ph = [ours["phases"].get(p, 0.0) for p in PHASES]
        seconds = [*ph, ours["seconds"] - sum(ph), ours["seconds"]]
        cells = [f"{v:.3f} ({v / copy_s:.1f}x)" for v in seconds]
        lines.append(f"| {size_label(s['mib'])} | {' | '.join(cells)} |")
    return [
        *lines,
        "",
        "The peers digest nothing: each costs its transport and a `copy_` into the model (the "
        "per-tensor broadcast pays gloo's latency per tensor, safetensors a write and a read "
        "of /dev/shm). Our refit adds, around its pull, the trainer's snapshot copy, the "
        "digests on both sides and the atomic apply. In-place publishing drops the snapshot "
        "copy: the trainer's parameters are pulled where they lie, and the version holds until "
        "the receivers release it. The mixed-TP rows run 3 (TP2->TP1, TP1->TP2) and 6 (TP2->TP4) "
        "processes on this VM's 2 cores: their ranks take turns on the CPU, with one intra-op "
        "thread each (with torch's default of one a core, OpenMP's spinning barriers made "
        "them 3-4x slower). A sharded rank reads a row-parallel slice, one short span a row, "
        "as its whole source shard into scratch (`min_span_bytes` 64 KiB): it pulls more "
        "than it holds, in a few large reads.",
    ]


# issue 19's goals, x copy_ (None: reported, no goal); per size, from a row's seconds or phase
GOALS_TABLE: tuple[tuple[str, str, str | None, float | None], ...] = (
    ("end to end, TP1->TP1", "refit_nixl", None, 3.0),
    ("end to end, TP2->TP1", "refit_nixl TP2->TP1", None, 4.0),
    ("publish, snapshot (one arena copy)", "refit_nixl", "publish", 1.2),
    ("publish, in place (registration only)", "refit_nixl_in_place", "publish", 0.0),
    ("pull (no goal: the transport)", "refit_nixl", "pull", None),
    ("one NIXL read, same bytes (no goal)", "nixl_read", None, None),
    ("verify", "refit_nixl", "verify", 1.0),
    ("apply", "refit_nixl", "apply", 1.2),
)


def _goals(sizes: list[Size]) -> list[str]:
    """Each goal of issue 19 against its measurement, and the memory goal, per size."""
    head = " | ".join(size_label(s["mib"]) for s in sizes)
    lines = [
        "### Against the goals",
        "",
        "Issue 19's goals, in x copy_ of the same bytes (memory: peak RSS, and the part above "
        "the runtime, over the bytes a rank holds; goal <= 2.2 at 1 GiB).",
        "",
        f"| goal | limit | {head} |",
        "|---|---:|" + "---:|" * len(sizes),
    ]
    for label, case, phase, limit in GOALS_TABLE:
        cells = []
        for s in sizes:
            r, copy_s = _rows(s).get(case), _rows(s).get("copy", {}).get("seconds")
            if r is None or not copy_s:
                cells.append("—")
                continue
            seconds = r["phases"].get(phase, 0.0) if phase else r["seconds"]
            cells.append(f"{seconds / copy_s:.2f}")
        limit_cell = "—" if limit is None else f"<= {limit:g}" if limit else "~0"
        lines.append(f"| {label} | {limit_cell} | {' | '.join(cells)} |")
    for case in ("refit_nixl", "refit_nixl_in_place"):
        for role in ("trainer", "receiver"):
            cells = []
            for s in sizes:
                r = _rows(s).get(case)
                peak, added = (
                    (r or {}).get(f"rss_peak_{role}_x"),
                    (r or {}).get(f"rss_added_{role}_x"),
                )
                cells.append("—" if peak is None else f"{peak:.2f} ({added:.2f} added)")
            lines.append(f"| peak RSS, {role}, {case} | <= 2.2 | {' | '.join(cells)} |")
    rows = _rows(sizes[-1])
    copy_s = rows.get("copy", {}).get("seconds")
    ours, read = rows.get("refit_nixl"), rows.get("nixl_read")
    if not (copy_s and ours and read):
        return lines
    x = {p: ours["phases"].get(p, 0.0) / copy_s for p in PHASES}
    limit = {p: g for _, case, p, g in GOALS_TABLE if case == "refit_nixl" and p and g}
    why = {
        "publish": "Publish: a `copy_` a shard into the arena, one per tensor, then the "
        "manifest's encoding and its round trip to the store. ",
        "verify": "Verify: XXH3 hashes at about copy_'s speed on one core, and the receiver's "
        "hashing shares the 2 cores with the trainer's signing. ",
        "apply": "Apply: one `copy_` of every tensor into the model, plus the atomic check that "
        "nothing moved. ",
    }
    return [
        *lines,
        "",
        f"What bounds the unmet ones here. End to end: at {size_label(sizes[-1]['mib'])} the "
        f"pull alone costs {x['pull']:.1f}x copy_, and one NIXL read of one buffer of the same "
        f"bytes {read['x_copy']:.1f}x: UCX's shared-memory (cma) transport copies on one core. "
        + (
            "So 3x copy_ is out of reach over NIXL on this machine whatever the other phases cost. "
            if x["pull"] >= 3
            else f"That leaves {3 - x['pull']:.2f}x copy_ for every other phase together. "
        )
        + ("".join(why[p] for p in why if x[p] > limit[p]) + _mixed_bound(rows, copy_s)).strip(),
    ]


def _mixed_bound(rows: dict[str, dict[str, Any]], copy_s: float) -> str:
    """TP2->TP1 against TP1->TP1, phase by phase: what the mixed layout adds."""
    mixed, matched = rows.get("refit_nixl TP2->TP1"), rows["refit_nixl"]
    if mixed is None:
        return ""
    cells = ", ".join(
        f"{p} {mixed['phases'].get(p, 0.0) / copy_s:.2f}x"
        f" ({matched['phases'].get(p, 0.0) / copy_s:.2f}x)"
        for p in (*PHASES, "translate")
    )
    return (
        f"TP2->TP1 ({mixed['seconds'] / copy_s:.1f}x; at TP1->TP1 in brackets): {cells}: "
        "its pull reads two sources, and three processes share the two cores; translate "
        "copies the row-parallel pieces out of scratch."
    )


PROJECTED_BYTES = 8e9  # an 8 GB model on 8 trainer + 8 inference ranks: 1 GB a rank
PROJECTED_RANKS = 8
NIC_8GB_S = 0.205  # the seed's figure: 8 GB over one 400 Gbps NIC


def _projection(sizes: list[Size]) -> list[str]:
    """Scale on paper: the largest size's measured per-byte phase costs, applied to 1 GB a
    rank, with the pull at the NIC's speed instead of this VM's."""
    size = sizes[-1]
    ours = _rows(size).get("refit_nixl")
    if ours is None:
        return []
    per_rank = PROJECTED_BYTES / PROJECTED_RANKS
    scale = per_rank / size["model_bytes"]
    local = {p: ours["phases"].get(p, 0.0) * scale for p in ("publish", "verify", "apply")}
    nic = {"one NIC a rank": NIC_8GB_S / PROJECTED_RANKS, "one NIC for all 8": NIC_8GB_S}
    lines = [
        "### Scale on paper",
        "",
        f"An 8 GB model on {PROJECTED_RANKS} trainer + {PROJECTED_RANKS} inference ranks "
        "(TP 8 on each side: 1 GB a rank, the ranks in parallel), from the per-byte costs of "
        f"our refit measured above at {size_label(size['mib'])} on this CPU VM, and the pull at "
        f"the seed's NIC figure (8 GB in {NIC_8GB_S} s over one 400 Gbps NIC). Publish, verify "
        "and apply run at this VM's memory speed here; on a GPU they run at HBM speed, so these "
        "rows bound them from above.",
        "",
        "| per rank, s | publish | pull | verify | apply | total |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, pull in nic.items():
        cells = [local["publish"], pull, local["verify"], local["apply"]]
        row = " | ".join(f"{c:.3f}" for c in [*cells, sum(cells)])
        lines.append(f"| {label} | {row} |")
    return lines
