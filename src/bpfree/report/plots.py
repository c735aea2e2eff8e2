"""Report figures (matplotlib, Agg backend): curves, time/energy to accuracy, Pareto, power trace.

Each function takes a :class:`~bpfree.report.aggregate.Summary` and returns a :class:`Plot`. A plot
with nothing to draw (e.g. energy where no counter was readable) is marked ``empty`` with the
reason; the report leaves it out and states the reason once. The figure's title is the report's
heading, not repeated inside the image.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bpfree.report.aggregate import Group, Summary  # noqa: E402

PALETTE = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # a ListedColormap


@dataclass
class Plot:
    name: str  # file stem
    title: str
    figure: Figure
    caption: str = ""
    empty: bool = False  # nothing measured to draw; ``caption`` says why

    def render(self) -> tuple[bytes, bytes]:
        """(PNG at 150 dpi, SVG); closes the figure."""
        png, svg = io.BytesIO(), io.BytesIO()
        self.figure.savefig(png, format="png", dpi=150, bbox_inches="tight")
        self.figure.savefig(svg, format="svg", bbox_inches="tight")
        plt.close(self.figure)
        return png.getvalue(), svg.getvalue()

    def png(self) -> bytes:
        return self.render()[0]


def colors(summary: Summary) -> dict[str, Any]:
    return {g.key: PALETTE[i % len(PALETTE)] for i, g in enumerate(summary.groups)}


def panels(summary: Summary) -> list[tuple[str, list[Group]]]:
    """One panel per alternative with its BP twin; groups in no pair get a panel of their own."""
    out: list[tuple[str, list[Group]]] = []
    used: set[str] = set()
    for pair in summary.pairs:
        members = [g for g in (pair.baseline, pair.alternative) if g is not None]
        title = pair.alternative.label if pair.baseline is None else f"{pair.alternative.label}\nvs {pair.baseline.label}"
        out.append((title, members))
        used.update(g.key for g in members)
    out += [(g.label, [g]) for g in summary.groups if g.key not in used]
    return out


def _grid(n: int, width: float = 4.6, height: float = 3.4) -> tuple[Figure, list[Any]]:
    n = max(1, n)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _empty(ax, text: str, width: int = 48) -> None:
    wrapped = "\n".join(textwrap.fill(part, width) for part in text.split("; "))
    ax.text(0.5, 0.5, wrapped, ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _phase_boundaries(ax, rows: list[dict[str, Any]], x_field: str) -> None:
    """A dotted line and the next phase's name where a run's curve moves to a new training phase."""
    previous = None
    for before, row in zip([None, *rows], rows):
        phase = row.get("phase")
        if previous is not None and phase != previous and before is not None and before.get(x_field) is not None:
            ax.axvline(before[x_field], color="0.6", ls=":", lw=1)
            ax.annotate(str(phase), (before[x_field], 0.02), xycoords=("data", "axes fraction"), fontsize=6, color="0.4", rotation=90)
        previous = phase


def _curve_panel(ax, groups: list[Group], palette: dict[str, Any], x_field: str) -> int:
    """Val accuracy (%) against ``x_field`` per seed; returns how many runs had any point."""
    drawn = 0
    for g in groups:
        labelled = False
        for r in g.runs:
            rows = r.get("curves") or []
            pts = [
                (row.get(x_field), row.get("val_accuracy"))
                for row in rows
                if row.get(x_field) is not None and row.get("val_accuracy") is not None
            ]
            if pts:
                xs, ys = zip(*pts)
                # Short curves get markers: a one- or two-epoch curve is otherwise invisible.
                marker = "o" if len(pts) <= 12 else None
                ax.plot(xs, [y * 100 for y in ys], color=palette[g.key], lw=1.2, alpha=0.85, marker=marker, ms=3,
                        label=None if labelled else g.label)
                if not labelled:  # once per group: its seeds share the phase schedule
                    _phase_boundaries(ax, rows, x_field)
                labelled = True
                drawn += 1
            if r.get("status") == "diverged":
                x_end = next((row.get(x_field) for row in reversed(rows) if row.get(x_field) is not None), None)
                y_end = pts[-1][1] * 100 if pts else 0.0
                if x_end is not None:
                    ax.plot([x_end], [y_end], marker="x", color=palette[g.key], ms=9, mew=2, ls="none",
                            label=None if labelled else f"{g.label} (diverged)")
                    ax.annotate(f"diverged (seed {r.get('seed')})", (x_end, y_end), fontsize=7, color=palette[g.key])
                    labelled = True
                    drawn += 1
    return drawn


def _pair_figure(summary: Summary, name: str, title: str, x_field: str, xlabel: str, missing: str) -> Plot:
    palette = colors(summary)
    items = panels(summary)
    fig, axes = _grid(len(items))
    notes = []
    for ax, (panel_title, groups) in zip(axes, items):
        ax.set_title(panel_title, fontsize=8)
        drawn = _curve_panel(ax, groups, palette, x_field)
        if drawn == 0:
            reasons = sorted({g.energy_note()[1] or "no data" for g in groups}) if x_field == "cumulative_energy_j" else ["no data"]
            text = f"{missing}: " + "; ".join(reasons)
            _empty(ax, text)
            notes.append(text)
            continue
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("val accuracy (%)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    caption = " ".join(sorted(set(notes)))
    return Plot(name, title, fig, caption, empty=len(notes) == len(items))


def training_curves(summary: Summary) -> Plot:
    return _pair_figure(summary, "curves", "Validation accuracy per epoch (one line per seed)", "epoch", "epoch", "no curves")


def time_to_accuracy(summary: Summary) -> Plot:
    return _pair_figure(
        summary, "time_to_accuracy", "Time to accuracy: val accuracy vs cumulative training time",
        "cumulative_train_time_s", "training time (s)", "no curves",
    )


def energy_to_accuracy(summary: Summary) -> Plot:
    return _pair_figure(
        summary, "energy_to_accuracy", "Energy to accuracy: val accuracy vs cumulative training energy",
        "cumulative_energy_j", "training energy (J)", "not measured",
    )


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both lower cost and higher accuracy, by increasing cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def pareto(summary: Summary) -> Plot:
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    palette = colors(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    notes = []
    legend: dict[str, Any] = {}
    for ax, (metric, xlabel) in zip(axes, (("train_time_s", "training time (s)"), ("train_flops", "training FLOPs"))):
        points = []
        for g in summary.groups:
            acc, cost = g.stat("test_accuracy"), g.stat(metric)
            if acc.mean is None or cost.mean is None or cost.mean <= 0:
                if g.diverged and not g.completed:
                    notes.append(f"{g.label}: every run diverged (no test accuracy)")
                continue
            yerr = None if acc.half_width is None else acc.half_width * 100
            handle = ax.errorbar(cost.mean, acc.mean * 100, xerr=cost.half_width, yerr=yerr, fmt="o", color=palette[g.key], capsize=3)
            legend.setdefault(g.label + (f" ({len(g.diverged)} diverged)" if g.diverged else ""), handle)
            points.append((cost.mean, acc.mean * 100))
        front = _pareto_front(points)
        if len(front) > 1:
            xs, ys = zip(*front)
            (line,) = ax.step(xs, ys, where="post", color="0.5", ls="--", lw=1)
            legend.setdefault("Pareto front (higher accuracy at lower cost)", line)
        if points:
            ax.set_xscale("log")
            # Labels at 1, 2 and 5 of every decade: a narrow range still gets several readable ticks.
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(EngFormatter(places=0, sep=""))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            _empty(ax, "no completed runs")
        ax.set_xlabel(xlabel + " (log)", fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
    rows = math.ceil(len(legend) / 3) if legend else 0
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, min(0.45, 0.045 * rows + 0.02), 1, 1))
    return Plot("pareto", "Accuracy versus cost (mean ± 95% CI over seeds)", fig, " ".join(sorted(set(notes))), empty=not legend)


def power_trace(summary: Summary) -> Plot:
    """Mean power per epoch (epoch energy / epoch training time) where energy was measured."""
    palette = colors(summary)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    drawn = 0
    for g in summary.groups:
        labelled = False
        for r in g.runs:
            pts = [
                (row["cumulative_train_time_s"], row["energy_j"] / row["epoch_time_s"])
                for row in r.get("curves") or []
                if row.get("energy_j") is not None and row.get("epoch_time_s") and row.get("cumulative_train_time_s") is not None
            ]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=".", color=palette[g.key], lw=1, label=None if labelled else g.label)
                labelled = True
                drawn += 1
    caption = ""
    if drawn == 0:
        reasons = sorted({g.energy_note()[1] or "no data" for g in summary.groups}) or ["no runs"]
        caption = "not measured: " + "; ".join(reasons)
        _empty(ax, caption)
    else:
        ax.set_xlabel("training time (s)", fontsize=8)
        ax.set_ylabel("mean power per epoch (W)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return Plot("power", "Power trace (per-epoch energy / epoch training time)", fig, caption, empty=drawn == 0)


def layer_accuracy_plot(summary: Summary) -> Plot:
    """Validation and test accuracy of each layer-local read-out (mean over seeds), one panel per group."""
    groups = [g for g in summary.groups if any(r.get("layer_accuracy") for r in g.completed)]
    fig, axes = _grid(len(groups))
    caption = "Each layer's own read-out of the trained model (MF projection, FF layer goodness, CaFo predictor alone, " \
        "NoProp block on the read-out chain); mean over seeds, test solid, validation dashed."
    if not groups:
        _empty(axes[0], "no layer-local read-outs in these results")
        caption = "no layer-local read-outs in these results"
    for ax, g in zip(axes, groups):
        names: list[str] = []
        for r in g.completed:
            for name in r.get("layer_accuracy") or {}:
                if name not in names:
                    names.append(name)
        for split, style in (("test", "-"), ("val", "--")):
            means = []
            for name in names:
                values = [r["layer_accuracy"][name][split] for r in g.completed if name in (r.get("layer_accuracy") or {})]
                means.append(100 * sum(values) / len(values))
            ax.plot(range(1, len(names) + 1), means, style, marker="o", label=split)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, fontsize=7)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.set_title(g.label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return Plot("layers", "Accuracy per layer (each layer-local read-out)", fig, caption, empty=not groups)


def all_plots(summary: Summary) -> list[Plot]:
    return [
        training_curves(summary), time_to_accuracy(summary), energy_to_accuracy(summary), pareto(summary),
        power_trace(summary), layer_accuracy_plot(summary),
    ]
