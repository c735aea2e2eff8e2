"""`bpfree tune`: Optuna TPE over an algorithm's declared search space, with one budget for all.

The budget (number of trials, epochs per trial) comes from the command, never from the algorithm,
so BP and every alternative get the same. Each trial is an ordinary run (early stopping on
validation accuracy, as always); its objective is the run's best validation accuracy and nothing
else: test accuracy is never read. The tuned values are written to a *new* YAML file; the input
config is never modified.

Storage is a URL: ``sqlite:///path.db`` (default ``<output>/optuna.db``, with a long lock timeout
and heartbeats so stale trials of killed workers are retried), ``journal:<path>`` (Optuna's
JournalStorage over a file, for many workers on a shared file system), or any other SQLAlchemy
URL (e.g. ``postgresql://...``), passed through. Studies are loaded if they exist, so an
interrupted tuning run continues where it stopped, and several workers may share one study: the
study stops at the requested number of completed trials.
"""

from __future__ import annotations

import inspect
import re
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bpfree.config import RunConfig, apply_assignments, build_config, read_yaml_mapping, set_dotted
from bpfree.errors import ConfigError, UserError
from bpfree.fileio import atomic_write_text

OBJECTIVE = "best_val_accuracy"
SQLITE_TIMEOUT_S = 120


@dataclass
class TuneOutcome:
    study_name: str
    storage: str
    algorithm: str
    trials: int
    epochs: int
    completed: int
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    tuned_path: Path
    trials_dir: Path


def objective_value(result: dict[str, Any]) -> float:
    """The tuning objective: best validation accuracy of a completed run, 0 if it diverged."""
    if result.get("status") != "completed":
        return 0.0
    value = result.get(OBJECTIVE)
    return float(value) if value is not None else 0.0


def _train(cfg: RunConfig) -> dict[str, Any]:
    """One trial's run (a separate function so tests can watch what the objective reads)."""
    from bpfree.runner import execute

    _, result = execute(cfg)
    return result


def _retry(fn: Callable[[], Any], attempts: int = 6) -> Any:
    """Retry storage setup when concurrent workers race on a locked SQLite file.

    Two workers creating a fresh database both try to write its schema version; the loser gets
    an IntegrityError and succeeds on retry, when the schema exists.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - only lock/contention errors are retried
            text = f"{type(exc).__name__}: {exc}"
            if attempt == attempts - 1 or not any(s in text for s in ("locked", "OperationalError", "IntegrityError", "StorageInternalError", "busy")):
                raise
            time.sleep(0.5 * 2**attempt)
    return None


def resolve_storage(url: str | None, output: Path) -> tuple[Any, str]:
    """(an Optuna storage object, its URL for messages)."""
    import optuna.storages as storages
    from optuna.storages import RDBStorage

    if url is None:
        url = f"sqlite:///{(Path(output) / 'optuna.db').resolve()}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        text = url.removeprefix("journal:").removeprefix("//").strip()
        if not text:
            raise UserError("--storage journal:<path>: missing the journal file path, e.g. journal:results/tune/optuna.log")
        path = Path(text).expanduser()
        if path.is_dir():
            raise UserError(f"--storage {url}: {path} is a directory; name the journal file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab"):  # the journal is appended to; fail now, not after a trial ran
                pass
            return JournalStorage(JournalFileBackend(str(path))), url
        except OSError as exc:
            raise UserError(f"--storage {url}: cannot write the journal file ({exc.strerror or exc})") from None
    if "://" not in url:
        raise UserError(f"--storage {url!r}: expected a URL such as sqlite:///optuna.db, journal:optuna.log or postgresql://...")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        db = url.split("///", 1)[1] if "///" in url else ""
        if db and db != ":memory:":
            try:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"--storage {url}: cannot create its folder ({exc.strerror or exc})") from None
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    # A trial whose worker died (no heartbeat for grace_period s) is failed and re-queued once or twice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are marked experimental in some Optuna versions
        retry_cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
        retry = retry_cls(max_retry=2)
    params = inspect.signature(RDBStorage.__init__).parameters
    callback = {"heartbeat_stale_trial_callback": retry} if "heartbeat_stale_trial_callback" in params else {"failed_trial_callback": retry}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = _retry(lambda: RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=180, **callback))  # type: ignore[arg-type]
    except (ImportError, ModuleNotFoundError) as exc:
        raise UserError(f"--storage {url}: its database driver is not installed ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a bad URL or unreachable server: one line
        raise UserError(f"--storage {url}: cannot open ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return storage, url


def suggest(trial: Any, space: Sequence[Any]) -> dict[str, Any]:
    """Draw one value per SearchDim; keys are dotted config keys ('lr', 'params.x')."""
    values: dict[str, Any] = {}
    for dim in space:
        if dim.kind == "log":
            values[dim.key] = trial.suggest_float(dim.key, float(dim.low), float(dim.high), log=True)
        elif dim.kind == "float":
            values[dim.key] = trial.suggest_float(dim.key, float(dim.low), float(dim.high))
        elif dim.kind == "int":
            values[dim.key] = trial.suggest_int(dim.key, int(dim.low), int(dim.high))
        elif dim.kind == "choice":
            values[dim.key] = trial.suggest_categorical(dim.key, list(dim.choices))
        else:
            raise UserError(f"search space of {dim.key}: unknown kind {dim.kind!r}")
    return values


def _budget_attrs(trials: int, epochs: int, cfg: RunConfig, config_path: Path) -> dict[str, Any]:
    return {
        "bpfree_trials": trials,
        "bpfree_epochs_per_trial": epochs,
        "bpfree_objective": OBJECTIVE,
        "bpfree_algorithm": cfg.algorithm,
        "bpfree_base_key": cfg.key(),
        "bpfree_config": str(config_path),
    }


STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_study_name(name: str) -> str:
    """A study name is also a folder under ``<output>/trials``: one plain path component."""
    if not STUDY_NAME.fullmatch(name) or ".." in name:
        raise UserError(
            f"--study-name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, no '..' or '/'); "
            f"it names a folder under --output"
        )
    return name


def _dump_tuned(path: Path, values: dict[str, Any], header: list[str]) -> None:
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(values, sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)


def tune(
    config: Path,
    trials: int,
    epochs: int,
    output: Path = Path("results/tune"),
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    out: Path | None = None,
    assignments: Sequence[str] = (),
    on_trial: Callable[[int, float, dict[str, Any]], None] | None = None,
) -> TuneOutcome:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from bpfree.algorithms import get_algorithm

    config = Path(config)
    if trials < 1:
        raise UserError(f"--trials {trials}: must be >= 1")
    if epochs < 1:
        raise UserError(f"--epochs {epochs}: must be >= 1")
    raw = apply_assignments(read_yaml_mapping(config), assignments)
    output = Path(output)
    base = build_config({**raw, "epochs": epochs, "checkpoint": False, "output": str(output)}, source=str(config))
    space = tuple(get_algorithm(base.algorithm).search_space)
    if not space:
        raise UserError(f"algorithm {base.algorithm}: declares no search space; nothing to tune")
    if study_name is not None:
        name = check_study_name(study_name)
    else:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", config.stem).strip(".-")[:80] or "study"
        name = f"{name}-{base.key()[:8]}"
    from bpfree.fileio import ensure_writable_dir

    output = ensure_writable_dir(output)
    trials_dir = output / "trials" / name
    tuned_path = Path(out) if out is not None else output / f"{config.stem}.tuned.yaml"
    if tuned_path.resolve() == config.resolve():
        raise UserError(f"--out {tuned_path}: is the input config; tuning never edits its input, choose another path")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store, url = resolve_storage(storage, output)
    sampler = optuna.samplers.TPESampler(seed=seed)
    try:
        study = _retry(lambda: optuna.create_study(study_name=name, storage=store, sampler=sampler, direction="maximize", load_if_exists=True))
    except Exception as exc:  # noqa: BLE001 - read-only or broken storage: one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--storage {url}: cannot create or load study {name!r} ({type(exc).__name__}: {detail[:200]})") from None
    attrs = _budget_attrs(trials, epochs, base, config)
    existing = study.user_attrs
    for key in ("bpfree_trials", "bpfree_epochs_per_trial", "bpfree_base_key"):
        if key in existing and existing[key] != attrs[key]:
            raise UserError(
                f"study {name!r} in {url}: was started with {key.removeprefix('bpfree_')}={existing[key]!r}, "
                f"not {attrs[key]!r}; use the same budget and config to resume, or another --study-name"
            )
    for key, value in attrs.items():
        if key not in existing:
            _retry(lambda key=key, value=value: study.set_user_attr(key, value))  # type: ignore[misc]

    # Ctrl-C must never land inside Optuna's bookkeeping (it then fails with an unrelated error and
    # a traceback): it stops the study, and only interrupts a trial's training where that is safe.
    interrupt = {"requested": False, "in_training": False}

    def on_sigint(signum: int, frame: Any) -> None:
        interrupt["requested"] = True
        try:
            study.stop()  # after the current trial
        except RuntimeError:  # not inside optimize yet (or any more): the flag is checked after it
            pass
        if interrupt["in_training"]:
            interrupt["in_training"] = False
            raise KeyboardInterrupt

    def objective(trial: Any) -> float:
        chosen = suggest(trial, space)
        values = set_dotted({**raw, "epochs": epochs, "checkpoint": False, "output": str(trials_dir)}, chosen)
        try:
            cfg = build_config(values, source=f"trial {trial.number}")
        except ConfigError as exc:
            raise UserError(f"search space of {base.algorithm} gave an invalid config: {exc}") from None
        try:
            interrupt["in_training"] = not interrupt["requested"]
            if interrupt["requested"]:
                raise KeyboardInterrupt
            result = _train(cfg)
            interrupt["in_training"] = False
        except KeyboardInterrupt:
            # Recorded as pruned (no value, no traceback in Optuna's log); a rerun fills the budget.
            interrupt["in_training"] = False
            trial.set_user_attr("interrupted", True)
            raise optuna.TrialPruned("interrupted") from None
        value = objective_value(result)
        trial.set_user_attr("run_id", result.get("run_id"))
        trial.set_user_attr("status", result.get("status"))
        trial.set_user_attr("epochs_run", result.get("epochs_run"))
        if on_trial is not None:
            on_trial(trial.number, value, chosen)
        return value

    def completed() -> list[Any]:
        return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)

    remaining = trials - len(completed())
    if remaining > 0:
        try:
            previous = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread: Ctrl-C is not ours to handle
            previous = None
        try:
            study.optimize(
                objective,
                n_trials=remaining,
                callbacks=[MaxTrialsCallback(trials, states=(TrialState.COMPLETE,))],
                gc_after_trial=True,
            )
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    if interrupt["requested"]:
        raise KeyboardInterrupt
    # With several workers a study can overshoot by a trial or two; only the first `trials` count.
    budget = completed()[:trials]
    if not budget:
        raise UserError(f"study {name!r}: no completed trials")
    best = max(budget, key=lambda t: (t.value, -t.number))
    best_params = {k: best.params[k] for k in (d.key for d in space) if k in best.params}
    tuned = set_dotted(raw, best_params)
    build_config(tuned, source=str(tuned_path))  # the file we write must load
    header = [
        f"Tuned by `bpfree tune {config}`: Optuna TPE (seed {seed}), study {name!r} in {url}.",
        f"Budget: {trials} trials x {epochs} epochs per trial (the same for every algorithm); "
        f"objective {OBJECTIVE} (validation only; test accuracy is never read).",
        f"Best: trial {best.number}, {OBJECTIVE} = {best.value:.4f}. Tuned keys: {', '.join(best_params)}.",
        f"Source config {config} is unchanged; epochs here are the final training budget, not the trial budget.",
    ]
    _dump_tuned(tuned_path, tuned, header)
    return TuneOutcome(name, url, base.algorithm, trials, epochs, len(budget), float(best.value), best_params, best.number, tuned_path, trials_dir)
