"""The plot shapes reports use: horizontal bars, per-phase stacked bars and grouped bars
(headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(path: Path, title: str, labels: Sequence[str], values: Sequence[float], unit: str) -> None:
    """One horizontal bar per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.35 * len(labels) + 1)))
    ax.barh(list(labels), list(values), color="#4c72b0")
    ax.set_xlabel(unit)
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stacked_bars(
    path: Path, title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]]
) -> None:
    """One bar per label, stacked by series (e.g. refit phases), in seconds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(labels) + 2), 4.5))
    bottom = [0.0] * len(labels)
    for name, values in series.items():
        ax.bar(list(labels), list(values), bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grouped_bars(
    path: Path,
    title: str,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    unit: str,
) -> None:
    """One group per label of ``groups``, one bar per series in each, labelled with its value."""
    plt = _pyplot()
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(series) * len(groups) + 2), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar_label(ax.bar(xs, list(values), width, label=name), fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
