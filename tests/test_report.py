"""Reports: numbers that follow from the stored results, valid figures, self-contained HTML."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from scipy import stats

from bpfree.config import build_config
from bpfree.protocol.compare import compare
from bpfree.report.aggregate import summarize, t_interval
from bpfree.report.render import write_report
from bpfree.runner import execute

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"dataset": "mnist5k", "model": "mlp:1x16", "epochs": 2, "batch_size": 256, "patience": None, "device": "cpu"}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    """A small comparison (MF vs its BP twin, 3 seeds) plus one run that diverges."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    configs = root / "configs"
    configs.mkdir()
    (configs / "mf_tiny.yaml").write_text(yaml.safe_dump({"algorithm": "mf", **TINY}))
    (configs / "zz_later.yaml").write_text(yaml.safe_dump({"algorithm": "not_yet_written", **TINY}))
    output = root / "results"
    outcome = compare([configs], output=output, seeds=[0, 1, 2], executor="inline")
    assert not outcome.suite.failed
    unstable = {**TINY, "algorithm": "bp", "model": "mlp:2x256", "optimizer": "sgd", "lr": 10.0, "epochs": 1, "output": str(output)}
    _, diverged = execute(build_config(unstable))
    assert diverged["status"] == "diverged"
    write_report(output)
    torch.set_num_threads(before)
    return output


def _stored(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*/result.json"))]


def test_delta_table_follows_from_the_stored_results(results_dir):
    runs = _stored(results_dir)
    mf = {r["seed"]: r for r in runs if r["algorithm"] == "mf"}
    bp = {r["seed"]: r for r in runs if r["algorithm"] == "bp" and r["model"] == "mlp:1x16"}
    assert sorted(mf) == sorted(bp) == [0, 1, 2]
    # The twin: same architecture and budget, BP's own optimiser settings.
    for seed in mf:
        for field in ("dataset", "model", "epochs", "batch_size", "patience", "seed"):
            assert mf[seed]["config"][field] == bp[seed]["config"][field]
        assert bp[seed]["config"]["params"] == {}

    def mean(values):
        return sum(values) / len(values)

    acc_pp = (mean([r["test_accuracy"] for r in mf.values()]) - mean([r["test_accuracy"] for r in bp.values()])) * 100
    time_pct = (mean([r["train_time_s"] for r in mf.values()]) / mean([r["train_time_s"] for r in bp.values()]) - 1) * 100
    flops_pct = (mean([r["train_flops"] for r in mf.values()]) / mean([r["train_flops"] for r in bp.values()]) - 1) * 100
    seeds = sorted(mf)
    p = stats.ttest_rel([mf[s]["test_accuracy"] for s in seeds], [bp[s]["test_accuracy"] for s in seeds]).pvalue

    summary = summarize(runs)
    [pair] = [p for p in summary.pairs if p.alternative.algorithm == "mf"]
    assert pair.baseline is not None and pair.baseline.model == "mlp:1x16" and len(pair.baseline.completed) == 3
    delta = summary.deltas[pair.alternative.key]
    assert delta.accuracy_pp == pytest.approx(acc_pp)
    assert delta.relative_pct["train_time_s"] == pytest.approx(time_pct)
    assert delta.relative_pct["train_flops"] == pytest.approx(flops_pct)
    assert delta.relative_pct["energy_j"] is None  # energy is null on this CPU, so no delta is invented
    assert delta.paired_n == 3
    if p == p:  # NaN when all three differences are equal
        assert delta.p_value == pytest.approx(p)

    # The same numbers, as printed, in report.md.
    md = (results_dir / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {pair.alternative.label} | {pair.baseline.label} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2 / 2"  # epoch budgets: MF trains all layers at once, so equal passes
    assert cells[3] == f"{acc_pp:+.2f}"
    assert cells[8] == f"{time_pct:+.1f}%"
    assert cells[9].startswith("n/a")
    assert cells[11] == f"{flops_pct:+.1f}%"


def test_confidence_interval_is_student_t():
    values = [0.91, 0.93, 0.92, 0.95]
    stat = t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=stat.mean, scale=stats.sem(values))
    assert stat.low == pytest.approx(low) and stat.high == pytest.approx(high)
    assert t_interval([0.9]).half_width is None and t_interval([]).mean is None


def test_report_files_hold_tables_and_valid_figures(results_dir):
    md = (results_dir / "report.md").read_text()
    html = (results_dir / "report.html").read_text()
    for needle in ("## Results", "## Against the BP twin", "| configuration |", "## Environment", "## Algorithms and declared deviations"):
        assert needle in md
    assert "skipped zz_later.yaml: algorithm 'not_yet_written' is not registered" in md  # a note, not a crash
    figures = sorted((results_dir / "figures").glob("*.png"))
    energy_measured = any(json.loads(p.read_text())["energy_j"] is not None for p in results_dir.glob("*/result.json"))
    expected = {"curves", "time_to_accuracy", "pareto", "layers"} | ({"energy_to_accuracy", "power"} if energy_measured else set())
    assert {f.stem for f in figures} == expected
    for figure in figures:
        assert figure.read_bytes().startswith(PNG_MAGIC)
        assert matplotlib.image.imread(figure).shape[0] > 100
        assert f"figures/{figure.name}" in md
        assert figure.with_suffix(".svg").read_text().lstrip().startswith("<?xml") and f"figures/{figure.stem}.svg" in html
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(embedded) == len(figures)
    assert all(base64.b64decode(blob).startswith(PNG_MAGIC) for blob in embedded)
    assert "<table>" in html and "Against the BP twin" in html and "src='figures/" not in html  # self-contained
    # Every table can be downloaded as CSV, linked from the page.
    for link in re.findall(r"href='(tables/[^']+\.csv)'", html):
        assert (results_dir / link).read_text().splitlines()[0].count(",") >= 1
    assert len(re.findall(r"href='tables/", html)) == html.count("<table>")
    if not energy_measured:
        # Energy is null here: said so with the reason, and its empty figures are left out, the reason given once.
        assert "null: " in md and md.count("figures left out") == 1 and "Energy to accuracy" in md.split("figures left out")[1].splitlines()[0]


def test_diverged_runs_are_shown_not_dropped(results_dir):
    md = (results_dir / "report.md").read_text()
    assert "1 (0 ok, 1 diverged)" in md
    runs_section = md.split("## Runs", 1)[1]
    assert re.search(r"\| diverged \| — \|", runs_section) and "loss became" in runs_section


def test_report_command_rebuilds_from_results_alone(results_dir, tmp_path):
    copy = tmp_path / "copy"
    for path in results_dir.glob("*/result.json"):
        (copy / path.parent.name).mkdir(parents=True)
        shutil.copy(path, copy / path.parent.name / "result.json")
    proc = subprocess.run(
        [sys.executable, "-m", "bpfree.cli", "report", str(copy), "--out", str(tmp_path / "rebuilt")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr

    def delta_rows(path: Path) -> list[str]:
        section = path.read_text().split("## Against the BP twin", 1)[1].split("##", 1)[0]
        return [line for line in section.splitlines() if line.startswith("| ") and "alternative" not in line]

    assert delta_rows(tmp_path / "rebuilt" / "report.md") == delta_rows(results_dir / "report.md")
    assert (tmp_path / "rebuilt" / "report.html").is_file()


def test_report_of_an_empty_directory_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bpfree.cli", "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no result.json" in lines[0]


def test_report_html_renders_in_a_headless_browser(results_dir):
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium/chrome installed (apt-get install chromium): headless rendering of report.html not checked")
    n_figures = len(list((results_dir / "figures").glob("*.png")))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # the plain browser still checks the DOM
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (results_dir / "report.html").as_uri()],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Against the BP twin" in proc.stdout and proc.stdout.count("<img") == n_figures
        return
    with sync_playwright() as p:
        page = p.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-gpu"]).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto((results_dir / "report.html").as_uri())
        # Every figure decoded to a real bitmap (a broken data URI leaves naturalWidth at 0).
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == n_figures and all(w > 300 for w in widths)
        headings = page.eval_on_selector_all("h2, h3", "hs => hs.map(h => h.textContent)")
        assert any("Against the BP twin" in h for h in headings)
        assert len(headings) == len(set(headings))  # one title per figure and table
        assert page.locator("a[href$='.csv']").count() == page.locator("table").count() > 0
        assert page.screenshot(full_page=True).startswith(b"\x89PNG") and not errors


def test_short_curves_have_markers_and_phase_changes_are_marked():
    from bpfree.report import plots

    def run(seed, algorithm, curves):
        return {"run_id": f"{algorithm}{seed}", "algorithm": algorithm, "dataset": "mnist5k", "model": "cnn3", "seed": seed,
                "status": "completed", "config": {"algorithm": algorithm, "dataset": "mnist5k", "model": "cnn3", "params": {}},
                "config_key": algorithm, "test_accuracy": 0.9, "train_time_s": 1.0, "curves": curves, "energy_j": None,
                "energy_reason": "no counter"}

    two_phase = [{"phase": "blocks", "epoch": 1, "val_accuracy": 0.5, "cumulative_train_time_s": 1.0},
                 {"phase": "calibrate", "epoch": 2, "val_accuracy": 0.6, "cumulative_train_time_s": 2.0}]
    summary = summarize([run(0, "cafo", two_phase), run(0, "bp", [{"phase": "train", "epoch": 1, "val_accuracy": 0.7}])])
    plot = plots.training_curves(summary)
    lines = [line for ax in plot.figure.axes for line in ax.get_lines()]
    assert any(line.get_marker() == "o" and len(line.get_xdata()) == 1 for line in lines)  # a one-point curve is visible
    assert any(list(line.get_xdata()) == [1, 1] for line in lines)  # the phase boundary after epoch 1
    assert not plot.figure._suptitle and not plot.empty  # the title is the report's heading, once
    assert plots.energy_to_accuracy(summary).empty and plots.power_trace(summary).empty
    plots.plt.close("all")
