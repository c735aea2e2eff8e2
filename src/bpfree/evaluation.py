"""``bpfree evaluate``: a completed run's saved weights on any compatible dataset split.

The run's config.json rebuilds the modules, ``weights.safetensors`` fills them, and the result
goes to ``<run_dir>/evaluations/<dataset>-<split>-<timestamp>.json``; result.json is never touched.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bpfree.errors import UserError
from bpfree.fileio import atomic_write_json
from bpfree.results import RESULT_FILE

SPLITS = ("test", "val", "train")
EVALUATIONS_DIR = "evaluations"


def evaluate_run(
    run_dir: Path,
    dataset: str | None = None,
    data_root: Path | None = None,
    split: str = "test",
    download: bool = False,
    device: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    from bpfree.build import build_run
    from bpfree.config import build_config
    from bpfree.loop import evaluate
    from bpfree.runner import load_run_config
    from bpfree.weights import WEIGHTS_FILE, load_weights

    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    stored = load_run_config(run_dir)
    if not (run_dir / RESULT_FILE).is_file():
        raise UserError(f"run directory {run_dir}: not completed (no {RESULT_FILE}); finish it with `bpfree resume {run_dir}`")
    values = stored.model_dump(mode="json")
    values.update(
        dataset=dataset or stored.dataset,
        data_root=str(data_root) if data_root is not None else values.get("data_root"),
        download=download,
        device=device or values["device"],
        compile=False,  # evaluation needs no compiled blocks
    )
    cfg = build_config(values, source=f"{run_dir}/config.json with --dataset {values['dataset']}")
    parts = build_run(cfg)
    trained = json.loads((run_dir / RESULT_FILE).read_text()).get("data") or {}
    spec = parts.data.spec
    if trained and (list(spec.input_shape) != trained.get("input_shape") or spec.num_classes != trained.get("num_classes")):
        raise UserError(
            f"--dataset {cfg.dataset}: inputs {list(spec.input_shape)} with {spec.num_classes} classes; "
            f"the run was trained on {trained.get('input_shape')} with {trained.get('num_classes')} classes"
        )
    load_weights(run_dir / WEIGHTS_FILE, parts.algorithm)
    parts.algorithm.modules().to(parts.device)
    parts.algorithm.end_training()  # the final inference rule, as after training
    data = parts.data
    x, y = {"test": (data.test_x, data.test_y), "val": (data.val_x, data.val_y), "train": (data.train_x, data.train_y)}[split]
    outcome = evaluate(parts.algorithm, x, y, cfg.eval_batch_size, kind=split, autocast=parts.autocast)
    now = datetime.now(timezone.utc)
    record = {
        "run_id": run_dir.name,
        "dataset": cfg.dataset,
        "split": split,
        "accuracy": outcome.accuracy,
        "n": int(x.shape[0]),
        "eval_time_s": outcome.seconds,
        "device": str(parts.device),
        "weights": WEIGHTS_FILE,
        "evaluated_at": now.isoformat(),
    }
    path = run_dir / EVALUATIONS_DIR / f"{cfg.dataset}-{split}-{now.strftime('%Y%m%dT%H%M%S%fZ')}.json"
    atomic_write_json(path, record)
    return path, record
