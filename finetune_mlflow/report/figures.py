"""The report's figures, drawn with matplotlib's object API (no pyplot state, Agg canvas) and returned as PNG
bytes; a figure with nothing to show is None, and the report says why instead."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from finetune_mlflow.report.runs import RunRecord, setting, varying_settings

# A curve longer than this is drawn faint with a moving average over it: per-step training loss is noisy.
SMOOTH_ABOVE_POINTS = 50
# Switch latency to a log axis when the slowest run is this many times the fastest (local ms vs hosted seconds).
LOG_LATENCY_RATIO = 20.0


@dataclass(frozen=True)
class Chart:
    title: str
    caption: str
    png: bytes


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _axes(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (8.0, 4.8)):
    figure = Figure(figsize=size)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _error_bars(records: Sequence[RunRecord]) -> np.ndarray:
    """2 x n distances below/above each eval_f1 (0 where the interval is missing)."""
    bars = np.zeros((2, len(records)))
    for i, record in enumerate(records):
        f1, low, high = (record.metric(k) for k in ("eval_f1", "eval_f1_ci_low", "eval_f1_ci_high"))
        if low is not None and high is not None:
            bars[:, i] = (f1 - low, high - f1)
    return bars


def _series_label(record: RunRecord, settings: Sequence[str]) -> str:
    parts = [f"{record.provider}/{record.base_model}"]
    parts += [f"{name.rsplit('.', 1)[-1]}={setting(record, name)}" for name in settings if setting(record, name)]
    return " ".join(parts)


def f1_by_epochs(records: Sequence[RunRecord]) -> Chart | None:
    """Validation F1 against epochs, one line per base model (and per other setting that varies), the base
    model's own F1 dashed: how many epochs pay off, and whether tuning beats the base at all."""
    usable = [r for r in records if r.epochs is not None and r.metric("eval_f1") is not None]
    if not usable:
        return None
    settings = varying_settings(usable)
    figure, axes = _axes("Validation F1 by epochs (bars: 95% CI)", "epochs", "F1")
    series: dict[str, list[RunRecord]] = {}
    for record in usable:
        series.setdefault(_series_label(record, settings), []).append(record)
    for label, members in sorted(series.items()):
        members.sort(key=lambda r: r.epochs)
        axes.errorbar([r.epochs for r in members], [r.metric("eval_f1") for r in members],
                      yerr=_error_bars(members), marker="o", capsize=4, label=label)
    bases = {(r.provider, r.base_model): r.metric("base_eval_f1") for r in usable if r.metric("base_eval_f1")}
    for (provider, base_model), f1 in sorted(bases.items()):
        axes.axhline(f1, linestyle="--", color="grey", linewidth=1)
        axes.annotate(f"base {base_model} {f1:.1f}", (0.01, f1), xycoords=("axes fraction", "data"),
                      fontsize=8, color="grey", va="bottom")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize=8)
    skipped = len(records) - len(usable)
    caption = "Dashed: each base model's F1 on the same split." + (
        f" {skipped} run(s) without an epochs setting are not drawn." if skipped else "")
    return Chart("F1 by epochs", caption, _png(figure))


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (the first points average what exists so far)."""
    data = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(data, 0, 0.0))
    counts = np.minimum(np.arange(1, len(data) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(data) + 1) - counts]) / counts


def loss_curves(records: Sequence[RunRecord], names: dict[str, str]) -> Chart | None:
    """Training (solid) and validation (dashed) loss of every run in one figure, one colour per run."""
    drawn = [r for r in records if r.curves]
    if not drawn:
        return None
    figure, axes = _axes("Training and validation loss", "training step", "loss", size=(9.0, 5.4))
    colours = [f"C{i % 10}" for i in range(len(drawn))]
    smoothed = False
    for record, colour in zip(drawn, colours):
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            curve = record.curves.get(key)
            if curve is None or not curve.steps:
                continue
            label = names[record.run_id] if key == "train_loss" or "train_loss" not in record.curves else None
            values = curve.values
            if len(values) > SMOOTH_ABOVE_POINTS:
                axes.plot(curve.steps, values, style, color=colour, alpha=0.2, linewidth=0.8)
                values = moving_average(values, max(len(values) // 25, 2))
                smoothed = True
            # Validation loss is sparse (every N steps): markers keep a one-point curve visible.
            marker = "o" if key == "val_loss" and len(values) <= SMOOTH_ABOVE_POINTS else None
            axes.plot(curve.steps, values, style, color=colour, label=label, linewidth=1.6, marker=marker,
                      markersize=4)
    axes.legend(fontsize=8, title="run (solid: train, dashed: validation)", title_fontsize=8)
    missing = len(records) - len(drawn)
    caption = " ".join(part for part in (
        "Long curves are drawn faint with their moving average on top." if smoothed else "",
        f"{missing} run(s) logged no loss history." if missing else "") if part)
    return Chart("Loss curves", caption, _png(figure))


def f1_by_latency(records: Sequence[RunRecord], names: dict[str, str]) -> Chart | None:
    """F1 against p95 latency per request: what a point of F1 costs in serving speed (base models hollow)."""
    usable = [r for r in records if r.metric("latency_ms_p95") is not None and r.metric("eval_f1") is not None]
    if not usable:
        return None
    figure, axes = _axes("Validation F1 against p95 latency (bars: 95% CI)", "p95 latency per request (ms)", "F1")
    latencies = [r.metric("latency_ms_p95") for r in usable]
    axes.errorbar(latencies, [r.metric("eval_f1") for r in usable], yerr=_error_bars(usable), fmt="o", capsize=4,
                  label="tuned")
    for record, latency in zip(usable, latencies):
        axes.annotate(names[record.run_id], (latency, record.metric("eval_f1")), fontsize=7,
                      textcoords="offset points", xytext=(5, 4))
    bases = {(r.provider, r.base_model): (r.metric("base_latency_ms_p95"), r.metric("base_eval_f1")) for r in usable
             if r.metric("base_latency_ms_p95") is not None and r.metric("base_eval_f1") is not None}
    for (provider, base_model), (latency, f1) in sorted(bases.items()):
        axes.plot([latency], [f1], "o", markerfacecolor="none", color="grey")
        axes.annotate(f"base {base_model}", (latency, f1), fontsize=7, color="grey",
                      textcoords="offset points", xytext=(5, -10))
    axes.margins(x=0.15, y=0.1)  # room for the run names written beside the points
    every = latencies + [latency for latency, _ in bases.values()]
    if min(every) > 0 and max(every) / min(every) > LOG_LATENCY_RATIO:
        axes.set_xscale("log")
    caption = "Hollow grey points: the base models on the same split." if bases else ""
    return Chart("F1 against latency", caption, _png(figure))


def cost_per_point(records: Sequence[RunRecord], names: dict[str, str]) -> Chart | None:
    """Estimated USD per point of F1 gained over the base model, for runs whose cost is known and that gained."""
    priced = sorted((r for r in records if r.cost_per_f1_point is not None), key=lambda r: r.cost_per_f1_point)
    if not priced:
        return None
    figure, axes = _axes("Estimated cost per point of F1 gained over base", "USD per F1 point", "",
                         size=(8.0, 1.2 + 0.4 * len(priced)))
    labels = [names[r.run_id] for r in priced]
    costs = [r.cost_per_f1_point for r in priced]
    axes.barh(labels, costs, color="C0")
    for y, value in enumerate(costs):
        axes.annotate(f"${value:,.2f}", (value, y), fontsize=8, textcoords="offset points", xytext=(4, -3))
    axes.invert_yaxis()
    return Chart("Cost per F1 point", "Cheapest gain first.", _png(figure))
