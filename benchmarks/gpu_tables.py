"""BENCHMARKS.md's GPU tables from the summaries of a device session (``benchmarks/gpu_session.py``).

    python3 benchmarks/gpu_tables.py SUMMARY_DIR [--write BENCHMARKS.md] [--plot benchmarks/noprop_depth_gpu.png]

Reads ``summary-tests-bench.json`` and ``summary-sweep-paper.json`` (either may be missing) and renders:
the GPU tests' outcome; the targets table (card, command, each target met or not) and the full
``bpfree bench`` table; the NoProp-DT depth table (T = 2, 5, 10, 20) and its plot; the MNIST paper
configs beside the prior study's numbers (prior-study report §4.2: mean ± std over 3 runs on an
A100, its training time including per-epoch validation and checkpoint I/O). Without ``--write`` the
markdown is printed; with it, the block between ``<!-- gpu:start -->`` and ``<!-- gpu:end -->`` of
that file is replaced (hand-written text around it is kept).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any
from urllib.parse import quote

from noprop_depth import plot as depth_plot  # benchmarks/noprop_depth.py, beside this script

from bpfree.bench import markdown as bench_markdown
from bpfree.bench import write_benchmarks_md
from bpfree.escape import markdown as md
from bpfree.fileio import load_json

GPU_START, GPU_END = "<!-- gpu:start -->", "<!-- gpu:end -->"
SUMMARY_BYTES = 16 * 2**20

# Prior-study report §4.2 (MNIST rows): test accuracy % (mean, std), training s (mean), epochs (mean), distinct seeds.
PRIOR_STUDY = {
    "bp_mnist_mlp_2x1000": ("BP MLP 2x1000", 98.05, 0.10, 39.8, 17.0, 3),
    "mf_mnist_mlp_2x1000": ("MF MLP 2x1000", 98.14, 0.02, 35.0, 15.3, 3),
    "bp_mnist_cnn3": ("BP CNN", 98.94, 0.16, 37.6, 16.0, 2),
    "cafo_rand_mnist_cnn3": ("CaFo-Rand", 98.62, 0.02, 69.2, 30.0, 2),
    "cafo_dfa_mnist_cnn3": ("CaFo-DFA", 99.02, 0.05, 84.5, 38.0, 3),
    "bp_mnist_mlp_3x1000": ("BP MLP 3x1000", 98.09, 0.06, 83.9, 36.0, 3),
    "ff_mnist_mlp_3x1000_adamw": ("FF 3x1000 AdamW", 98.33, 0.03, 370.7, 77.0, 1),
    "ff_mnist_mlp_3x1000_sgd": ("FF 3x1000 SGD", 98.22, 0.04, 444.8, 99.3, 2),
    "bp_mnist_mlp_4x2000": ("BP MLP 4x2000", 98.43, 0.03, 125.8, 50.0, 1),
    "ff_mnist_mlp_4x2000": ("FF 4x2000", 98.42, 0.14, 509.6, 87.0, 3),
}


def code(text: Any) -> str:
    """A Markdown code span (escapes do not apply inside one; a backtick would end it)."""
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def load(directory: Path, call: str) -> dict[str, Any] | None:
    path = directory / f"summary-{call}.json"
    return load_json(path, max_bytes=SUMMARY_BYTES) if path.is_file() else None


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def session_header(summary: dict[str, Any]) -> list[str]:
    m = summary.get("machine", {})
    card = m.get("gpu") or "no GPU (a CPU rehearsal)"
    lines = [f"### {md(card)}: {md(summary['call'])}, torch {md(m.get('torch'))}, CUDA {md(m.get('cuda'))}, Python {md(m.get('python'))}", ""]
    if summary.get("rehearsal"):
        lines += ["**Rehearsal** (tiny models on mnist5k, short budgets): these numbers only show the pipeline works.", ""]
    steps = ", ".join(f"{md(s['name'])} {md(s['status'])} in {s['seconds']:.0f} s" for s in summary.get("steps", []))
    lines += [f"Steps: {steps}.", ""]
    return lines


def tests_section(summary: dict[str, Any]) -> list[str]:
    tests = summary.get("tests")
    if not tests:
        return ["GPU tests: no result."]
    if "error" in tests:
        return [f"GPU tests: {md(tests['error'])}."]
    lines = [f"GPU tests ({code(tests.get('command', 'pytest -m gpu tests/test_gpu.py'))}): {tests['passed']} passed, {tests['failures']} failed, "
             f"{tests['errors']} errors, {tests['skipped']} skipped."]
    for failed in tests.get("failed", []):
        message = md(failed["message"].splitlines()[0] if failed["message"] else "")
        lines.append(f"- {md(failed['test'])} ({md(failed['kind'])}): {message}")
    return lines


def target_rows(report: dict[str, Any]) -> list[str]:
    lines = [
        "| case | model | batch | epoch s | vs BP | vs reference | target | met | % of peak | J/epoch | CUDA graphs |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in report.get("rows", []):
        checks = []
        if r.get("target_ratio"):
            checks.append((f"≤ {r['target_ratio']:g}× BP", r["ratio_vs_bp"] <= r["target_ratio"]))
        if r.get("target_vs_reference"):
            checks.append((f"≤ {r['target_vs_reference']:g}× reference", r["ratio_vs_reference"] <= r["target_vs_reference"]))
        if r.get("target_epoch_s"):
            checks.append((f"epoch ≤ {r['target_epoch_s']:g} s", r["epoch_s"] <= r["target_epoch_s"]))
        target = ", ".join(text for text, _ in checks) or "—"
        met = ", ".join("yes" if ok else "**no**" for _, ok in checks) or "—"
        graphs = r.get("cuda_graphs") or {}
        eager = graphs.get("eager_kinds") or {}
        capture = "—" if not graphs else f"{len(graphs.get('captured_kinds', []))} captured" + (f", {len(eager)} eager" if eager else "")
        lines.append(
            f"| {md(r['label'])} | {md(r['model'])} | {r['batch_size']} | {r['epoch_s']:.3f} | {r['ratio_vs_bp']:.2f}× | "
            f"{r['ratio_vs_reference']:.2f}× | {target} | {met} | {100 * r['peak_share']:.0f}% | {_f(r.get('joules_per_epoch'), 1)} | {capture} |"
        )
    return lines


def bench_section(summary: dict[str, Any]) -> list[str]:
    report = summary.get("bench")
    if not report:
        return ["`bpfree bench`: no result (see the session's logs)."]
    command = report.get("command", "bpfree bench --device cuda --dataset mnist")
    captured = " captured in one CUDA graph" if str(report.get("machine", {}).get("device", "")).startswith("cuda") else " (eager)"
    lines = [f"Targets ({code(command)}; epoch = median of {report['epochs']} timed epochs after a warm-up epoch; the reference "
             f"is plain PyTorch BP on the same model and batch{captured}):", ""]
    lines += target_rows(report) + ["", "The whole `bpfree bench` table:", ""]
    lines.append(bench_markdown(report, command).replace("### ", "#### ", 1))
    return lines


def depth_section(summary: dict[str, Any], plot_path: Path | None, link: str | None = None) -> list[str]:
    depth = summary.get("noprop_depth") or {}
    rows = sorted(depth.get("rows", []), key=lambda r: r["T"])
    if not rows:
        return ["NoProp-DT depth sweep: no result."]
    lines = [f"NoProp-DT (parallel blocks) against its BP twin by depth ({code(depth['command'])}; {md(depth['dataset'])}, batch "
             f"{depth['batch']}, median of {depth['epochs']} timed epochs after a warm-up epoch; peak memory of the training windows):", "",
             "| T | model | NoProp epoch s | BP epoch s | time vs BP | NoProp peak MiB | BP peak MiB | memory vs BP |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n, b = r["noprop"], r["bp"]
        nm, bm = n.get("peak_memory_bytes") or 0, b.get("peak_memory_bytes") or 0
        lines.append(
            f"| {r['T']} | {md(r['model'])} | {n['epoch_s']:.3f} | {b['epoch_s']:.3f} | {n['epoch_s'] / b['epoch_s']:.2f}× | "
            f"{nm / 2**20:.0f} | {bm / 2**20:.0f} | {f'{nm / bm:.2f}×' if bm else '—'} |"
        )
    if depth.get("missing_depths"):
        lines += ["", f"Not measured within the step's time limit: T = {', '.join(map(str, depth['missing_depths']))}."]
    if plot_path is not None:
        depth_plot(rows, str(plot_path), f"NoProp-DT vs BP by depth ({rows[0]['noprop']['device']})")
        lines += ["", f"![NoProp-DT vs BP by depth]({quote(link or plot_path.as_posix())})"]
    return lines


def paper_section(summary: dict[str, Any]) -> list[str]:
    paper = summary.get("paper") or {}
    configs = paper.get("configs", [])
    if not configs:
        return ["MNIST paper configs: no result."]
    lines = [
        f"MNIST paper configs (`src/bpfree/configs/paper/`, seed 0, checkpoints off), each on a budget of "
        f"{paper['budget_per_config_s']:g} s of training: a config still running when its budget is spent stops after that "
        "epoch and is reported as its **first N epochs** (no test accuracy; the last validation accuracy instead). "
        "Epoch s is the median training-window time (validation apart). Prior study: report §4.2, mean ± std over 3 runs "
        "on an A100 (loader-bound; its time includes per-epoch validation and checkpoint I/O).", "",
        "| config | status | epochs (of max) | epoch s | train s | test acc % | last val acc % | prior test acc % | prior train s | prior epochs | prior s/epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in configs:
        epochs = c.get("epochs") or []
        times = [e["epoch_time_s"] for e in epochs if e.get("epoch_time_s") is not None]
        last_val = next((e["val_accuracy"] for e in reversed(epochs) if e.get("val_accuracy") is not None), None)
        prior = PRIOR_STUDY.get(c["config"])
        n = c.get("epochs_run")
        status = c["status"] if c["status"] != "stopped at budget" else f"first {n} epoch{'s' if n != 1 else ''} (budget)"
        if c.get("reason"):
            status += f": {c['reason']}"
        test = c.get("test_accuracy")
        cells = [
            md(c["config"]), md(status), f"{c.get('epochs_run', '—')} ({c.get('max_epochs', '—')})",
            _f(statistics.median(times) if times else None), _f(c.get("train_time_s"), 1),
            _f(100 * test if test is not None else None, 2), _f(100 * last_val if last_val is not None else None, 2),
            f"{prior[1]:.2f} ± {prior[2]:.2f}" + (f" ({prior[5]} seed{'s' if prior[5] > 1 else ''})" if prior[5] < 3 else "") if prior else "—",
            f"{prior[3]:.1f}" if prior else "—", f"{prior[4]:.1f}" if prior else "—", f"{prior[3] / prior[4]:.2f}" if prior else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if paper.get("not_run"):
        lines += ["", f"Not run within the call's time limit: {', '.join(md(n) for n in paper['not_run'])}."]
    return lines


def render(directory: Path, plot_path: Path | None = None, link: str | None = None) -> str:
    lines: list[str] = []
    first = load(directory, "tests-bench")
    second = load(directory, "sweep-paper")
    if first is None and second is None:
        raise SystemExit(f"{directory}: no summary-tests-bench.json or summary-sweep-paper.json")
    if first is not None:
        lines += session_header(first) + tests_section(first) + [""] + bench_section(first) + [""]
    if second is not None:
        lines += session_header(second) + depth_section(second, plot_path, link) + [""] + paper_section(second) + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path, help="the folder holding the session's summary-*.json files")
    parser.add_argument("--write", type=Path, help="replace the GPU block of this Markdown file (BENCHMARKS.md)")
    parser.add_argument("--plot", type=Path, help="write the NoProp depth plot here (PNG) and link it")
    args = parser.parse_args()
    link = None
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
    if args.plot is not None and args.write is not None:  # the image link is relative to the Markdown file
        link = Path(os.path.relpath(args.plot.resolve(), args.write.resolve().parent)).as_posix()
    text = render(args.directory, args.plot, link)
    if args.write is None:
        print(text)
        return
    write_benchmarks_md(args.write, text, GPU_START, GPU_END)
    print(f"updated {args.write}")


if __name__ == "__main__":
    main()
