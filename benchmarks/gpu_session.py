"""Every GPU figure in two device calls, ordered by value, each ending well inside 8 minutes.

From the project root on the GPU machine (one ``run`` call each, carry=[".gpu-carry"]):

    source .gpu-carry/setup.sh && python3 benchmarks/gpu_session.py tests-bench   # (a) about 4 min
    source .gpu-carry/setup.sh && python3 benchmarks/gpu_session.py sweep-paper   # (b) about 5 min

(a) ``tests-bench``: the GPU tests (``pytest -m gpu tests/test_gpu.py``), then ``bpfree bench`` on the
    MNIST target cases with the captured plain-PyTorch reference row.
(b) ``sweep-paper``: the NoProp-DT depth sweep T = 2, 5, 10, 20 against its BP twin (each row printed as
    it finishes), then the MNIST paper configs with checkpoints off, each on a training-time budget:
    a config that does not finish inside its budget stops after the epoch that crosses it and is
    reported as its first N epochs (per-epoch time and validation accuracy), declared as such.

Every step runs in a child process with its own time limit, so a hang or a crash costs that step only.
Each call writes, into ``$OUT`` (or ``--out``; default ./gpu-out), after every step:
``summary-<call>.json`` (machine-readable; ``benchmarks/gpu_tables.py`` turns it into BENCHMARKS.md's
GPU tables) and ``logs-<call>.tar.gz`` (every step's full log): two files per call.

The GPU image lacks some of what Zeus imports to read NVML's energy counter; pack these wheels too
(``python3 benchmarks/gpu_session.py extra-wheels`` prints them pinned to this environment's versions).
Without them the session still runs and records energy as unavailable, with the reason.

Rehearse on CPU before spending device time (tiny models on mnist5k, short budgets, same code paths):

    python3 benchmarks/gpu_session.py tests-bench --device cpu --rehearse --out /tmp/rehearsal
    python3 benchmarks/gpu_session.py sweep-paper --device cpu --rehearse --out /tmp/rehearsal
    python3 benchmarks/gpu_tables.py /tmp/rehearsal
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET  # noqa: S405 - parses the junit file this script's own pytest child wrote
from pathlib import Path
from typing import Any

import torch

from bpfree.bench import GPU_CASES, markdown, run_bench
from bpfree.build import resolve_device
from bpfree.capture import CaptureError
from bpfree.config import build_config, read_yaml_mapping
from bpfree.engine import Engine
from bpfree.fileio import append_line, atomic_write_json, read_jsonl
from bpfree.meters.energy import EnergyMeter

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PAPER_DIR = ROOT / "src" / "bpfree" / "configs" / "paper"
# What Zeus (ZeusMonitor, NVML) imports beyond the packed wheels, as distributions; pinned from this environment.
ZEUS_IMPORTS = ("httpx", "httpcore", "h11", "anyio", "certifi", "idna", "scikit-learn", "joblib", "threadpoolctl", "narwhals",
                "nvidia-ml-py")
# MNIST paper configs by value: each alternative right after its BP twin, the cheapest comparisons first.
PAPER_CONFIGS = (
    "bp_mnist_mlp_2x1000", "mf_mnist_mlp_2x1000",
    "bp_mnist_cnn3", "cafo_rand_mnist_cnn3", "cafo_dfa_mnist_cnn3",
    "bp_mnist_mlp_3x1000", "ff_mnist_mlp_3x1000_adamw",
    "noprop_dt_mnist",
    "bp_mnist_mlp_4x2000", "ff_mnist_mlp_4x2000",
    "ff_mnist_mlp_3x1000_sgd",
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Time limits (seconds) and sizes of one session; ``rehearsal`` shrinks them for a CPU run."""

    tests_s: int = 170
    bench_s: int = 200
    bench_epochs: int = 3
    depth_s: int = 150
    depths: tuple[int, ...] = (2, 5, 10, 20)
    depth_shape: str = "c32,h256"
    depth_epochs: int = 2
    paper_s: int = 240  # all paper configs together
    paper_config_s: float = 15.0  # training time per config before it stops at the next epoch end
    dataset: str = "mnist"
    tiny: bool = False  # tiny models (rehearsal)
    max_epochs: int | None = None  # cap on a paper config's epochs (rehearsal)


FULL = Budget()
REHEARSAL = Budget(
    tests_s=300, bench_s=300, bench_epochs=1, depth_s=200, depths=(2, 3), depth_shape="c2,h16", depth_epochs=1,
    paper_s=300, paper_config_s=2.0, dataset="mnist5k", tiny=True, max_epochs=2,
)
TINY_MODELS = {"mlp": "mlp:2x64", "cnn3": "cnn3:4,8,16", "noprop": "noprop:2,c2,h16"}


def tiny_model(spec: str) -> str:
    family = spec.split(":")[0]
    return TINY_MODELS.get(family, spec)


# -- child steps -------------------------------------------------------------------------------------


class Session:
    """One call: its steps, its summary file and its packed logs."""

    def __init__(self, call: str, out: Path, device: str, rehearse: bool) -> None:
        self.call, self.out, self.device, self.rehearse = call, out, device, rehearse
        self.budget = REHEARSAL if rehearse else FULL
        self.logs = Path(tempfile.mkdtemp(prefix=f"bpfree-{call}-"))
        self.started = time.perf_counter()
        self.summary: dict[str, Any] = {
            "call": call, "device": device, "rehearsal": rehearse, "budget": dataclasses.asdict(self.budget),
            "machine": machine(device), "steps": [], "started_unix": time.time(),
        }

    def save(self) -> None:
        self.summary["wall_s"] = time.perf_counter() - self.started
        atomic_write_json(self.out / f"summary-{self.call}.json", self.summary)
        packed = self.out / f".logs-{self.call}.tar.gz.tmp"
        with tarfile.open(packed, "w:gz") as tar:
            tar.add(self.logs, arcname=f"logs-{self.call}")
        os.replace(packed, self.out / f"logs-{self.call}.tar.gz")

    def step(self, name: str, argv: list[str], limit_s: float, env: dict[str, str] | None = None) -> int | None:
        """Run a child, its output both printed and logged, killed at ``limit_s``; returns its exit status."""
        log = self.logs / f"{name}.log"
        print(f"== {name} (limit {limit_s:.0f} s): {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if self.device == "cpu":  # a rehearsal on a shared CPU: several OpenMP threads per process stall badly
            child_env["OMP_NUM_THREADS"] = "1"
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), child_env.get("PYTHONPATH", "")) if p)
        with open(log, "w") as handle:
            proc = subprocess.Popen(argv, cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            killed = threading.Event()

            def kill() -> None:
                killed.set()
                proc.kill()

            timer = threading.Timer(limit_s, kill)
            timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    handle.write(line)
                    print(f"   {line}", end="", flush=True)
                rc = proc.wait()
            finally:
                timer.cancel()
        seconds = time.perf_counter() - start
        status = "timed out" if killed.is_set() else "ok" if rc == 0 else f"exit {rc}"
        print(f"   -> {status} after {seconds:.1f} s", flush=True)
        self.summary["steps"].append({"name": name, "status": status, "rc": rc, "seconds": seconds, "limit_s": limit_s})
        self.save()
        return None if killed.is_set() else rc


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    meter = EnergyMeter(torch.device(device))
    info["energy"] = {"method": meter.method or None, "reason": meter.reason, "min_window_s": meter.min_window_s}
    print(f"energy counters: {meter.method or 'none'}{'' if meter.available else f' ({meter.reason})'}", flush=True)
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "name,driver_version,memory.total,power.limit,clocks.max.sm"
            done = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    return info


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and failures from the junit file of the pytest child."""
    if not path.is_file():
        return {"error": "no junit file (pytest did not finish)"}
    root = ET.parse(path).getroot()  # noqa: S314 - written by this session's own pytest child
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                               "message": (node.get("message") or "")[:2000]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


# -- (a) tests and bench -------------------------------------------------------------------------------


def tests_bench(session: Session) -> None:
    b = session.budget
    junit = session.logs / "junit.xml"
    marker = "gpu" if session.device == "cuda" else "not gpu"  # a CPU rehearsal runs the CPU variants
    session.step(
        "gpu-tests", [sys.executable, "-m", "pytest", "-q", "-m", marker, "tests/test_gpu.py", "-p", "no:cacheprovider",
                      f"--junitxml={junit}"],
        b.tests_s, env={"BPFREE_GPU_TESTS": "1"},
    )
    session.summary["tests"] = {**junit_summary(junit), "command": f"BPFREE_GPU_TESTS=1 pytest -m '{marker}' tests/test_gpu.py"}
    session.save()
    report = session.logs / "bench.json"
    argv = [sys.executable, str(Path(__file__)), "worker-bench", "--device", session.device, "--json", str(report)]
    session.step("bench", argv + (["--rehearse"] if session.rehearse else []), b.bench_s)
    if report.is_file():
        session.summary["bench"] = json.loads(report.read_text())
    session.save()


def worker_bench(device: str, path: Path, rehearse: bool) -> None:
    b = REHEARSAL if rehearse else FULL
    cases = GPU_CASES if not b.tiny else tuple(dataclasses.replace(c, model=tiny_model(c.model)) for c in GPU_CASES)
    report = run_bench(cases, b.dataset, b.bench_epochs, device, progress=lambda text: print(f"bench: {text}", flush=True))
    command = f"bpfree bench --device {device} --dataset {b.dataset} --epochs {b.bench_epochs}"
    report["command"] = command if not b.tiny else command + " (rehearsal: tiny models)"
    print(markdown(report, report["command"]), flush=True)
    atomic_write_json(path, report)


# -- (b) NoProp depth sweep and paper configs ----------------------------------------------------------


def sweep_paper(session: Session) -> None:
    b = session.budget
    rows = session.logs / "noprop_depth.jsonl"
    session.step(
        "noprop-depth",
        [sys.executable, str(HERE / "noprop_depth.py"), "--device", session.device, "--dataset", b.dataset,
         "--epochs", str(b.depth_epochs), "--shape", b.depth_shape, "--depths", *map(str, b.depths), "--no-plot",
         "--jsonl", str(rows)],
        b.depth_s,
    )
    depth = read_jsonl(rows).records if rows.is_file() else []
    session.summary["noprop_depth"] = {
        "rows": depth, "dataset": b.dataset, "epochs": b.depth_epochs, "shape": b.depth_shape, "batch": 128,
        "command": f"python3 benchmarks/noprop_depth.py --device {session.device} --dataset {b.dataset} "
                   f"--epochs {b.depth_epochs} --shape {b.depth_shape}",
        "missing_depths": [t for t in b.depths if t not in {r["T"] for r in depth}],
    }
    session.save()

    results = session.logs / "paper.jsonl"
    deadline = time.perf_counter() + b.paper_s
    remaining = list(PAPER_CONFIGS)
    while remaining and time.perf_counter() < deadline - 10:
        argv = [sys.executable, str(Path(__file__)), "worker-paper", "--device", session.device, "--jsonl", str(results),
                *(["--rehearse"] if session.rehearse else []), *remaining]
        rc = session.step(f"paper-{len(PAPER_CONFIGS) - len(remaining) + 1:02d}", argv, deadline - time.perf_counter())
        done = {r["config"] for r in (read_jsonl(results).records if results.is_file() else [])}
        left = [c for c in remaining if c not in done]
        if rc == 0 or not left:
            remaining = left
            break
        if rc == RESTART:  # the worker recorded a failed capture and quit: the rest in a fresh process
            remaining = left
            continue
        # the worker died (a crash, or the deadline) in the first config it had not finished: record it, go on
        append_line(results, json.dumps({"config": left[0], "status": "failed" if rc is not None else "stopped at the call's time limit",
                                         "reason": f"worker ended ({'exit ' + str(rc) if rc is not None else 'killed at the limit'}); see its log"}))
        remaining = left[1:]
    records = read_jsonl(results).records if results.is_file() else []
    session.summary["paper"] = {
        "configs": records, "budget_per_config_s": b.paper_config_s, "dataset": b.dataset,
        "not_run": [c for c in PAPER_CONFIGS if c not in {r["config"] for r in records}],
        "command": f"python3 benchmarks/gpu_session.py worker-paper --device {session.device} CONFIG "
                   f"(checkpoint: false, seed 0, {b.paper_config_s:g} s training budget per config)",
    }
    session.save()


class BudgetReached(Exception):
    pass


RESTART = 3  # worker-paper's exit status after a failed capture (recorded): CUDA state in this process is unusable


def worker_paper(device: str, path: Path, names: list[str], rehearse: bool) -> None:
    b = REHEARSAL if rehearse else FULL
    output = Path(tempfile.mkdtemp(prefix="bpfree-paper-"))
    for name in names:
        record = run_paper_config(name, device, b, output)
        append_line(path, json.dumps(record, allow_nan=False))
        if record.get("capture_failed"):
            sys.exit(RESTART)


def run_paper_config(name: str, device: str, b: Budget, output: Path) -> dict[str, Any]:
    values = read_yaml_mapping(PAPER_DIR / f"{name}.yaml")
    overrides: dict[str, Any] = {"device": device, "checkpoint": False, "seed": 0, "output": str(output)}
    if b.tiny:
        overrides.update(dataset=b.dataset, model=tiny_model(values["model"]))
    if b.max_epochs is not None:
        overrides["epochs"] = min(values.get("epochs", 10), b.max_epochs)
    cfg = build_config({**values, **overrides})
    engine = Engine(cfg)
    max_epochs = sum(p.epochs for p in engine.algorithm.schedule())
    record: dict[str, Any] = {"config": name, "algorithm": cfg.algorithm, "model": cfg.model, "dataset": cfg.dataset,
                              "max_epochs": max_epochs, "budget_s": b.paper_config_s}

    def stop_at_budget(event: dict[str, Any]) -> None:
        if event.get("event") == "epoch" and engine.state.train_time_s >= b.paper_config_s and event["epochs_run"] < max_epochs:
            raise BudgetReached

    engine.progress_callback = stop_at_budget
    start = time.perf_counter()
    print(f"paper config {name}: up to {max_epochs} epochs, budget {b.paper_config_s:g} s of training", flush=True)
    try:
        result = engine.run()
        record.update(status=result["status"], test_accuracy=result["test_accuracy"], best_val_accuracy=result["best_val_accuracy"],
                      energy_j=result["energy_j"], energy_reason=result["energy_reason"], cuda_graphs=result["cuda_graphs"])
    except BudgetReached:
        record.update(status="stopped at budget", test_accuracy=None)
    except CaptureError as exc:
        record.update(status="failed", reason=str(exc), capture_failed=True)
    except Exception as exc:  # noqa: BLE001 - recorded, and the next config runs
        record.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    curves = engine.state.curves
    record.update(
        epochs_run=engine.state.epochs_run, train_time_s=engine.state.train_time_s, wall_s=time.perf_counter() - start,
        epochs=[{k: row.get(k) for k in ("phase", "epoch", "train_loss", "val_accuracy", "epoch_time_s")} for row in curves],
    )
    last = curves[-1] if curves else {}
    print(f"paper config {name}: {record['status']} after {record['epochs_run']} epochs, {record['train_time_s']:.1f} s training, "
          f"last val acc {last.get('val_accuracy')}, test acc {record.get('test_accuracy')}", flush=True)
    return record


# -- entry point -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("call", choices=["tests-bench", "sweep-paper", "worker-bench", "worker-paper", "extra-wheels"])
    parser.add_argument("configs", nargs="*", help="worker-paper: the paper configs to run, in order")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    parser.add_argument("--rehearse", action="store_true", help="tiny models on mnist5k and short budgets (a CPU rehearsal)")
    parser.add_argument("--json", type=Path, help="worker-bench: where to write the report")
    parser.add_argument("--jsonl", type=Path, help="worker-paper: where to append one line per config")
    args = parser.parse_intermixed_args()
    if args.call == "extra-wheels":
        print(" ".join(f"{name}=={metadata.version(name)}" for name in ZEUS_IMPORTS))
        return
    if args.call == "worker-bench":
        worker_bench(args.device, args.json, args.rehearse)
        return
    if args.call == "worker-paper":
        worker_paper(args.device, args.jsonl, args.configs, args.rehearse)
        return
    resolve_device(args.device)  # one clear line when CUDA is missing
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(args.call, args.out, args.device, args.rehearse)
    try:
        (tests_bench if args.call == "tests-bench" else sweep_paper)(session)
    finally:
        session.save()
        print(f"wrote {args.out / f'summary-{args.call}.json'} and {args.out / f'logs-{args.call}.tar.gz'} "
              f"({session.summary['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
