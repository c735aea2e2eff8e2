"""Tables and report files: the same cells feed the terminal (rich), report.md and report.html.

``write_report(results_dir)`` reads stored result records only, so a report can be rebuilt at any
time from a results directory; ``bpfree compare`` calls the same function after its runs.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bpfree.errors import UserError
from bpfree.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir, printable_path
from bpfree.report.aggregate import (
    COST_METRICS,
    Delta,
    Group,
    Stat,
    Summary,
    declared_deviations,
    environments,
    epoch_budget,
    summarize,
)
from bpfree.results import read_results

TABLES_DIR = "tables"
NOTES_FILE = "compare.json"  # optional notes left by `bpfree compare` (skipped pairs, failures)
FIGURES_DIR = "figures"


@dataclass
class TableData:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Report:
    summary: Summary
    tables: list[TableData]
    markdown: Path
    html: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- cell formatting -----------------------------------------------------------------------------
def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def fmt_flops(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def fmt_stat(stat: Stat, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    if stat.mean is None:
        return "—"
    mean = f"{stat.mean * scale:.{digits}f}"
    half = "n/a" if stat.half_width is None else f"{stat.half_width * scale:.{digits}f}"
    return f"{mean} ± {half}{unit}"


def fmt_signed(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}{unit}"


def fmt_p(value: float | None, note: str = "n/a") -> str:
    if value is None:
        return note or "n/a"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def runs_cell(g: Group) -> str:
    parts = [f"{len(g.completed)} ok"]
    if g.diverged:
        parts.append(f"{len(g.diverged)} diverged")
    repeats = sum(1 for r in g.runs if r.get("status") == "completed") - len(g.completed)
    if g.duplicate_seeds:  # a repeated seed is no independent replicate: counted once
        parts.append(f"DUPLICATE SEEDS {', '.join(map(str, g.duplicate_seeds))}: {repeats} repeat(s) not counted")
    other = len(g.runs) - len(g.completed) - repeats - len(g.diverged)
    if other:
        parts.append(f"{other} other")
    return f"{len(g.runs)} ({', '.join(parts)})"


class Footnotes:
    """Long texts (energy methods, reasons for null) become numbered notes under a table."""

    def __init__(self, limit: int = 36) -> None:
        self.limit = limit
        self.items: list[str] = []

    def ref(self, text: str) -> str:
        if len(text) <= self.limit:
            return text
        if text not in self.items:
            self.items.append(text)
        return f"[{self.items.index(text) + 1}]"

    def caption(self) -> str:
        return " ".join(f"[{i + 1}] {t}" for i, t in enumerate(self.items))


def energy_cell(g: Group, notes: Footnotes | None = None) -> str:
    notes = notes or Footnotes(limit=10_000)
    method, reason = g.energy_note()
    stat = g.stat("energy_j")
    if stat.mean is None:
        return f"null: {notes.ref(reason or 'not measured')}"
    text = f"{fmt_stat(stat, digits=1)} J ({notes.ref(method or 'method not recorded')})"
    measured = sum(1 for r in g.completed if r.get("energy_j") is not None)
    if measured < len(g.completed):
        text += f"; {measured}/{len(g.completed)} runs measured, others null: {notes.ref(reason or 'not measured')}"
    return text


# -- tables --------------------------------------------------------------------------------------
def results_table(summary: Summary) -> TableData:
    columns = ["configuration", "runs", "test acc (%)", "best val (%)", "epochs", "train time (s)", "energy", "peak memory",
               "train FLOPs", "stopping rule"]
    rows = []
    notes = Footnotes()
    for g in summary.groups:
        readout = f" (test read-out: {g.config['readout']})" if str(g.model).startswith("noprop") and g.config.get("readout") else ""
        rows.append(
            [
                g.label + readout,
                runs_cell(g),
                fmt_stat(g.stat("test_accuracy"), 100),
                fmt_stat(g.stat("best_val_accuracy"), 100),
                fmt_stat(g.stat("epochs_run"), digits=1),
                fmt_stat(g.stat("train_time_s"), digits=1),
                energy_cell(g, notes),
                fmt_bytes(g.stat("peak_memory_bytes").mean),
                fmt_flops(g.stat("train_flops").mean),
                stopping_cell(g.config),
            ]
        )
    methods = sorted({m for g in summary.groups for m in [g.memory_method()] if m})
    caption = (
        "Mean ± half-width of the two-sided 95% confidence interval (Student t, n−1 d.o.f.) over seeds; "
        "n/a when only one seed. Accuracy and cost statistics use completed runs; diverged runs are counted in "
        "'runs' and listed under Runs. Stopping rule: the metric each phase early-stops on, the minimum "
        "improvement, the patience, and which weights a phase keeps (best monitored epoch, last, or best "
        "validation accuracy). Peak memory: " + ("; ".join(methods) or "not recorded") + ". Energy: "
        + (notes.caption() or "as shown.")
    )
    return TableData("Results", columns, rows, caption)


def stopping_cell(config: dict[str, Any]) -> str:
    """The run's stopping rule in a few words, e.g. 'val_loss (Δ>0.001, patience 8), keeps last'."""
    patience = config.get("patience")
    monitor = config.get("monitor", "val_accuracy")
    delta = config.get("min_delta", 0.0) or 0.0
    restore = config.get("restore", "best")
    if patience is None:
        return f"no early stop, keeps {restore} ({monitor})"
    threshold = f"Δ>{delta:g}, " if delta else ""
    return f"{monitor} ({threshold}patience {patience}), keeps {restore}"


def delta_table(summary: Summary) -> TableData:
    columns = [
        "alternative", "BP twin", "epoch budget (alt / BP)", "Δ test acc (pp)", "paired Δ (pp, 95% CI)", "p (paired t)",
        "p (Holm)", "effect d_z (95% CI)", "Δ time", "Δ energy", "Δ peak mem", "Δ train FLOPs",
    ]
    rows = []
    ci_methods = set()
    for pair in summary.pairs:
        delta: Delta | None = summary.deltas.get(pair.alternative.key)
        if pair.baseline is None or delta is None:
            rows.append([pair.alternative.label, "none found", budget_cell(pair.alternative, None)] + ["n/a"] * (len(columns) - 3))
            continue
        ci_methods.add(delta.ci_method)
        paired = "n/a (no shared seeds)"
        if delta.paired_n:
            if delta.paired_low_pp is None or delta.paired_high_pp is None:
                interval = "n/a"
            else:
                interval = f"[{delta.paired_low_pp:+.2f}, {delta.paired_high_pp:+.2f}]"
            paired = f"{delta.paired_mean_pp:+.2f} {interval} (n={delta.paired_n})"
        effect = "n/a"
        if delta.effect_dz is not None:
            effect = f"{delta.effect_dz:+.2f} [{delta.effect_dz_low:+.2f}, {delta.effect_dz_high:+.2f}]"
        rel = {m: delta.relative_pct.get(m) for m in COST_METRICS}
        energy = fmt_signed(rel["energy_j"], 1, "%")
        if rel["energy_j"] is None:
            energy = "n/a (energy null)" if pair.alternative.stat("energy_j").mean is None or pair.baseline.stat("energy_j").mean is None else "n/a"
        rows.append(
            [
                pair.alternative.label,
                pair.baseline.label,
                budget_cell(pair.alternative, pair.baseline),
                fmt_signed(delta.accuracy_pp),
                paired,
                fmt_p(delta.p_value, delta.p_note),
                fmt_p(delta.holm_p_value, delta.p_note),
                effect,
                fmt_signed(rel["train_time_s"], 1, "%"),
                energy,
                fmt_signed(rel["peak_memory_bytes"], 1, "%"),
                fmt_signed(rel["train_flops"], 1, "%"),
            ]
        )
    how = " and ".join(sorted({"t": "Student t", "bootstrap": "percentile bootstrap"}[m] for m in ci_methods)) or "Student t"
    caption = (
        "Each alternative against its BP twin (same dataset and model, closest budget). Epoch budget: the most passes "
        "over the training data each may make (all phases summed). Δ test acc: difference of "
        f"means in percentage points; paired Δ: mean per-seed difference over seeds completed in both groups with its "
        f"95% CI ({how}); p: two-sided paired t-test on test accuracy across those seeds (n/a with fewer than 2); "
        "p (Holm): adjusted by Holm's step-down method across every alternative in this report; d_z: paired Cohen's "
        "d_z (mean difference / SD of differences) with a normal-approximation 95% CI. Cost deltas "
        "are relative to the BP mean: (alternative / BP − 1) × 100."
    )
    return TableData("Against the BP twin", columns, rows, caption)


def budget_cell(alternative: Group, baseline: Group | None) -> str:
    def text(g: Group | None) -> str:
        value = None if g is None else epoch_budget(g)
        return "?" if value is None else str(value)

    return f"{text(alternative)} / {text(baseline)}" if baseline is not None else f"{text(alternative)} / —"


def run_note(r: dict[str, Any]) -> str:
    parts = [r.get("reason") or ("resumed from checkpoint" if r.get("resumed") else "")]
    if r.get("contended"):  # the run waited for its cores: its wall time reflects the machine's load
        share = r.get("cpu_share")
        parts.append(f"CONTENDED (CPU share {share:.2f}, load {r.get('load_average_end') or 0:.1f})" if share is not None else "CONTENDED")
    return "; ".join(p for p in parts if p)


def runs_table(summary: Summary) -> TableData:
    columns = ["run", "configuration", "seed", "status", "test acc (%)", "best val (%)", "epochs", "train time (s)", "energy (J)", "note"]
    rows = []
    for g in summary.groups:
        for r in g.runs:
            acc = r.get("test_accuracy")
            val = r.get("best_val_accuracy")
            energy = r.get("energy_j")
            rows.append(
                [
                    str(r.get("run_id", "?")),
                    g.label,
                    str(r.get("seed")),
                    str(r.get("status")),
                    "—" if acc is None else f"{acc * 100:.2f}",
                    "—" if val is None else f"{val * 100:.2f}",
                    str(r.get("epochs_run")),
                    f"{r.get('train_time_s', 0.0):.1f}",
                    "null" if energy is None else f"{energy:.1f}",
                    run_note(r),
                ]
            )
    return TableData("Runs", columns, rows, "Every stored run, diverged ones included.")


def environment_table(results: Sequence[dict[str, Any]]) -> TableData:
    rows = []
    for key, values in environments(results):
        if len(values) == 1:
            rows.append([key, values[0][0]])
        else:
            rows.append([key, "; ".join(f"{v} ({n} runs)" for v, n in values)])
    return TableData("Environment", ["field", "value"], rows, "As recorded with each run; differing values are listed with their counts.")


def deviations_table(results: Sequence[dict[str, Any]]) -> TableData:
    rows = []
    for name, paper, devs in declared_deviations(results):
        rows.append([name, paper or "—", "\n".join(f"• {d}" for d in devs) if devs else "none declared"])
    return TableData("Algorithms and declared deviations", ["algorithm", "paper", "deviations from the paper"], rows)


def build_tables(summary: Summary) -> list[TableData]:
    return [
        results_table(summary),
        delta_table(summary),
        runs_table(summary),
        environment_table(summary.results),
        deviations_table(summary.results),
    ]


def rich_table(data: TableData):
    from rich.table import Table

    table = Table(title=data.title, caption=data.caption or None, caption_justify="left", show_lines=False)
    for column in data.columns:
        table.add_column(column, overflow="fold")
    for row in data.rows:
        table.add_row(*row)
    return table


# -- markdown and html ---------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def markdown_table(data: TableData) -> str:
    lines = [f"## {data.title}", ""]
    if data.rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in data.columns) + " |")
        lines.append("|" + "|".join("---" for _ in data.columns) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in data.rows]
    else:
        lines.append("_(empty)_")
    if data.caption:
        lines += ["", data.caption]
    return "\n".join(lines) + "\n"


def html_table(data: TableData) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in data.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c)).replace(chr(10), '<br>')}</td>" for c in row) + "</tr>" for row in data.rows
    )
    caption = f"<p class='caption'>{html.escape(data.caption)}</p>" if data.caption else ""
    csv_link = f" <a class='csv' href='{TABLES_DIR}/{table_slug(data)}.csv' download>CSV</a>"
    return f"<h2>{html.escape(data.title)}{csv_link}</h2>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{caption}\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1300px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.82em;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
.caption,.note{font-size:0.85em;color:#555}a.csv{font-size:0.7em;font-weight:normal;margin-left:0.5em}figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}
"""


def _header_lines(results_dir: Path, summary: Summary) -> list[str]:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"Results directory: `{printable_path(results_dir)}`; {len(summary.results)} runs in {len(summary.groups)} configurations; generated {stamp}.",
        "Every number below is computed from the stored `result.json` files; rebuild with `bpfree report "
        f"{printable_path(results_dir)}`.",
    ]


def table_slug(data: TableData) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in data.title.lower()).strip("-")
    return "-".join(part for part in slug.split("-") if part) or "table"


def write_table_csv(path: Path, data: TableData) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(data.columns)
    writer.writerows(data.rows)
    atomic_write_text(path, buffer.getvalue())


def render_markdown(title: str, header: list[str], notes: list[str], tables: list[TableData], figures: list[tuple[str, str, str]]) -> str:
    parts = [f"# {title}", "", *header, ""]
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    parts += [markdown_table(tables[0]), markdown_table(tables[1])]
    parts += ["## Figures", ""]
    for rel_path, fig_title, caption in figures:
        parts += [f"### {fig_title}", "", f"![{fig_title}]({rel_path})", ""]
        if caption:
            parts += [caption, ""]
    parts += [markdown_table(t) for t in tables[2:]]
    return "\n".join(parts)


def render_html(title: str, header: list[str], notes: list[str], tables: list[TableData], figures: list[tuple[str, str, bytes, str]]) -> str:
    def md_inline(text: str) -> str:  # the header uses `code` spans only
        escaped = html.escape(text)
        pieces = escaped.split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))

    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f"<p class='note'>{md_inline(line)}</p>" for line in header]
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    body += [html_table(tables[0]), html_table(tables[1]), "<h2>Figures</h2>"]
    for name, fig_title, png, caption in figures:
        data = base64.b64encode(png).decode("ascii")
        cap = f"<figcaption class='caption'>{html.escape(caption)}</figcaption>" if caption else ""
        svg_link = f" <a class='csv' href='{FIGURES_DIR}/{html.escape(name)}.svg'>SVG</a>"
        body.append(
            f"<figure id='fig-{html.escape(name)}'><h3>{html.escape(fig_title)}{svg_link}</h3>"
            f"<img alt='{html.escape(fig_title)}' src='data:image/png;base64,{data}'/>{cap}</figure>"
        )
    body += [html_table(t) for t in tables[2:]]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'/>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def read_notes(results_dir: Path) -> list[str]:
    path = Path(results_dir) / NOTES_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    notes = data.get("notes") if isinstance(data, dict) else None
    return [str(n) for n in notes] if isinstance(notes, list) else []


def write_notes(results_dir: Path, notes: list[str], extra: dict[str, Any] | None = None) -> None:
    atomic_write_json(Path(results_dir) / NOTES_FILE, {"notes": list(notes), **(extra or {})})


def write_report(
    results_dir: Path,
    out_dir: Path | None = None,
    title: str = "bpfree comparison report",
    notes: Sequence[str] | None = None,
    ci: str = "t",
) -> Report:
    """Aggregate ``results_dir/*/result.json`` and write report.md, report.html and figures/*.png."""
    from bpfree.report import plots

    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"results directory {printable_path(results_dir)}: not found")
    found = read_results(results_dir)
    results = found.records
    if not results:
        what, why = ("no valid result.json files", f"; {found.rejected_note()}") if found.rejected else ("no result.json files", "")
        raise UserError(f"results directory {printable_path(results_dir)}: {what} (run `bpfree compare` or `bpfree suite` first){why}")
    out_dir = ensure_writable_dir(out_dir or results_dir, flag="--out" if out_dir is not None else "--output")
    all_notes = list(notes) if notes is not None else read_notes(results_dir)
    rejected = found.rejected_note()
    if rejected is not None:
        all_notes.append(rejected)
    summary = summarize(results, ci=ci)
    duplicated = [g.label for g in summary.groups if g.duplicate_seeds]
    if duplicated:
        all_notes.append(
            "duplicate seeds (repeats not counted as independent replicates): " + "; ".join(duplicated)
        )
    tables = build_tables(summary)
    fig_dir = out_dir / FIGURES_DIR
    md_figs, html_figs, paths = [], [], []
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
        left_out: dict[str, list[str]] = {}
        for plot in plots.all_plots(summary):
            if plot.empty:  # no data to draw: left out, its reason stated once below
                plots.plt.close(plot.figure)
                left_out.setdefault(plot.caption or "no data", []).append(plot.title)
                continue
            png, svg = plot.render()
            path = fig_dir / f"{plot.name}.png"
            atomic_write_bytes(path, png)  # a full disk leaves the previous figure, never half a new one
            atomic_write_bytes(fig_dir / f"{plot.name}.svg", svg)
            paths.append(path)
            md_figs.append((f"{FIGURES_DIR}/{plot.name}.png", plot.title, plot.caption))
            html_figs.append((plot.name, plot.title, png, plot.caption))
        for reason, titles in left_out.items():
            all_notes.append(f"figures left out ({', '.join(titles)}): {reason}")
        for table in tables:  # every table also as CSV, linked from report.html
            write_table_csv(out_dir / TABLES_DIR / f"{table_slug(table)}.csv", table)
        header = _header_lines(results_dir, summary)
        atomic_write_text(md_path, render_markdown(title, header, all_notes, tables, md_figs))
        atomic_write_text(html_path, render_html(title, header, all_notes, tables, html_figs))
    except OSError as exc:
        flag = "--out" if out_dir != results_dir else "--output"
        raise UserError(
            f"report in {printable_path(out_dir)}: cannot write ({exc.strerror or exc}); the results are intact, "
            f"rerun `bpfree report` with space or another {flag}"
        ) from None
    return Report(summary, tables, md_path, html_path, paths, all_notes)
