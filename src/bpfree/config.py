"""Run configuration: a validated, frozen pydantic model loaded from YAML and/or CLI flags.

Precedence: code defaults < YAML file < CLI flags. Unknown keys are errors, and every error is
reported as one line naming the field and what is allowed. ``RunConfig`` is the one judge of a
run: a config that validates can be planned, scheduled and trained (the algorithm trains the
model family, every number is finite, types are exact: ``epochs: true`` is not 1).

YAML (files and ``--set`` values) is read with the YAML 1.2 core scalars: ``010`` is ten, ``1:20``
is text and ``yes`` is text, and documents whose aliases expand beyond a fixed size are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bpfree.errors import ConfigError

# Fields that say where or how to store (or resume) a run, not what the run computes: they do not
# enter the run's identity key, so changing them never makes a finished run count as new.
NON_IDENTITY_FIELDS = ("output", "data_root", "download", "name", "checkpoint", "verify_checksums", "telemetry_interval_s")

# Fields added after records were first stored, with their defaults: at the default they stay out of
# the identity, so earlier records keep their keys and groups (and their checkpoints resume).
LATER_FIELD_DEFAULTS: dict[str, Any] = {"eval_every": None}

# ``eval_every``: "<fraction> epoch" (0 < fraction < 1) or "<n> steps"; see :func:`parse_eval_every`.
EVAL_EVERY_FORMS = "'<fraction> epoch' with 0 < fraction <= 1 (e.g. '0.25 epoch'), '<n> steps' with n >= 1 (e.g. '200 steps'), or null"
_EVAL_EVERY = re.compile(r"\s*(?:(?P<fraction>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*epochs?|(?P<steps>[0-9]{1,12})\s*steps?)\s*")
MAX_EVAL_EVERY_STEPS = 10**9

# Each model family's native architecture: what an algorithm trains when no model is given.
# An algorithm's native family is the first of its ``model_families``.
NATIVE_MODELS = {"mlp": "mlp:2x1000", "cnn3": "cnn3", "noprop": "noprop", "*": "mlp:2x1000"}

# Seeds: a count or list longer than this is a typo, not a study.
MAX_SEEDS = 10_000
MAX_SEED = 2**31 - 1

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]


class RunConfig(BaseModel):
    """Everything that defines one training run."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    algorithm: str = Field("bp", description="training algorithm (see `bpfree list`)")
    dataset: str = Field("mnist5k", description="dataset name (see `bpfree list`)")
    model: str = Field(
        "mlp:2x1000", description="architecture, e.g. mlp:2x1000, cnn3, noprop:10 (default: the algorithm's native one)"
    )
    epochs: StrictInt = Field(10, ge=1, le=100_000, description="maximum epochs (per phase for phased algorithms)")
    batch_size: StrictInt = Field(128, ge=1, le=1_000_000)
    drop_last: StrictBool = Field(False, description="drop the last, smaller training batch of every epoch (the prior study's loaders)")
    eval_batch_size: StrictInt = Field(1000, ge=1, le=1_000_000)
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    patience: StrictInt | None = Field(10, ge=1, description="early-stopping patience in epochs on the monitored metric; null disables")
    monitor: Literal["val_accuracy", "val_loss", "local_loss"] = Field(
        "val_accuracy",
        description="early-stopping metric: validation accuracy, or the validation cross-entropy of the phase's read-out "
        "(val_loss; local_loss names the same number for layer-local phases, whose read-out is their local objective)",
    )
    restore: Literal["best", "last", "best_accuracy"] = Field(
        "best", description="weights a phase ends with: best monitored epoch, last epoch, or best validation accuracy"
    )
    min_delta: float = Field(0.0, ge=0, le=1e6, description="an epoch improves only by more than this (units of the monitored metric)")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    init: Literal["default", "prior"] = Field(
        "default", description="weight init: PyTorch defaults, or the prior study's per-layer-type scheme (bpfree.models.init)"
    )
    readout: Literal["mean", "sampled"] = Field(
        "mean",
        description="test-time read-out of NoProp-family models (mean path, or sampled chain from a fixed seed); "
        "an alternative's BP twin copies it, so both are read out by one rule",
    )
    flush_denormal: StrictBool = Field(True, description="flush subnormal floats to zero on CPU (steady epoch times; see README)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_root: Path | None = Field(None, description="directory holding torchvision datasets")
    download: StrictBool = Field(False, description="let torchvision download missing datasets")
    verify_checksums: StrictBool = Field(
        True, description="check dataset files against their official md5 sums (CIFAR); false only for a re-packed copy you trust"
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="validation share of the training set (not MNIST: fixed 50k/10k)")
    amp: StrictBool = Field(False, description="bf16 autocast for training and evaluation steps (meant for GPUs)")
    channels_last: StrictBool = Field(False, description="channels-last memory format for images and conv weights")
    compile: StrictBool = Field(False, description="torch.compile each model block (first epoch includes compile time)")
    divergence_factor: float | None = Field(
        1000.0, gt=1, le=1e12, description="a phase diverges when its epoch loss exceeds this multiple of its first-step loss; null disables"
    )
    cuda_graphs: StrictBool = Field(True, description="on CUDA, replay each training step from a captured CUDA graph (no effect on CPU)")
    checkpoint: StrictBool = Field(True, description="write a resumable checkpoint after every epoch")
    eval_every: str | None = Field(
        None,
        description="evaluation points between epoch ends: '<fraction> epoch' (e.g. '0.25 epoch': every quarter epoch) or "
        "'<n> steps' (every n optimiser steps of the run); null: at epoch ends only. Early stopping and checkpoints stay at epoch ends",
    )
    telemetry_interval_s: float | None = Field(
        0.1, ge=0.01, le=3600, description="seconds between telemetry samples (telemetry.csv beside result.json); null: no sampler"
    )
    output: Path = Field(Path("results"), description="results directory; each run writes <output>/<run_id>/")
    name: str | None = Field(None, description="free-form label stored with the result")
    params: dict[str, Any] = Field(default_factory=dict, description="algorithm-specific hyperparameters")

    @model_validator(mode="before")
    @classmethod
    def _native_model(cls, data: Any) -> Any:
        """Without a model, the algorithm trains its native architecture."""
        if isinstance(data, dict) and data.get("model") is None and isinstance(data.get("algorithm", "bp"), str):
            from bpfree.algorithms import ALGORITHMS

            algorithm = data.get("algorithm", "bp")
            if algorithm in ALGORITHMS:
                data = {**data, "model": default_model(algorithm)}
        return data

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        from bpfree.algorithms import get_algorithm

        get_algorithm(value)  # an unknown name raises a ValueError listing the registered ones
        return value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from bpfree.data import DATASETS

        DATASETS.get(value)
        return value

    @field_validator("model")
    @classmethod
    def _parsable_model(cls, value: str) -> str:
        from bpfree.models import parse_model_spec

        value = "".join(value.split()).lower()  # one spelling per architecture: no whitespace, lower case
        parse_model_spec(value)  # raises ValueError with the accepted forms
        return value

    @field_validator("eval_every", mode="before")
    @classmethod
    def _eval_every_form(cls, value: Any) -> str | None:
        return canonical_eval_every(value)

    @field_validator("output", "data_root")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("params")
    @classmethod
    def _valid_algorithm_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from bpfree.algorithms import get_algorithm

        algorithm = info.data.get("algorithm")
        if algorithm is None:  # the algorithm itself was invalid; that error is reported instead
            return value
        _refuse_non_finite(value, "params")
        params_cls = get_algorithm(algorithm).Params
        _refuse_bools_for_numbers(params_cls, value, "params")
        try:
            validated = params_cls.model_validate(value)
        except ValidationError as exc:
            raise ValueError(_format_validation_error(exc, prefix="params.")) from None
        _refuse_non_finite(validated.model_dump(mode="python"), "params")  # e.g. a string "inf" read as a float
        return value

    @model_validator(mode="after")
    def _algorithm_trains_model(self) -> RunConfig:
        from bpfree.algorithms import get_algorithm
        from bpfree.models import parse_model_spec

        family, _ = parse_model_spec(self.model)
        families = get_algorithm(self.algorithm).model_families
        if "*" not in families and family.prefix not in families:
            raise ValueError(
                f"field 'model': algorithm {self.algorithm} trains {', '.join(families)} models, not {self.model!r}"
                f" (without --model it trains {default_model(self.algorithm)})"
            )
        return self

    def algorithm_params(self) -> BaseModel:
        """The algorithm's own hyperparameters, validated, with defaults filled in."""
        from bpfree.algorithms import get_algorithm

        return get_algorithm(self.algorithm).Params.model_validate(self.params)

    def resolved(self) -> dict[str, Any]:
        """The full config as plain JSON types, algorithm defaults included."""
        data = self.model_dump(mode="json")
        data["params"] = self.algorithm_params().model_dump(mode="json")
        return data

    def key(self, device_type: str | None = None) -> str:
        """A stable hash of what the run computes; equal keys mean the same run.

        Storage fields (:data:`NON_IDENTITY_FIELDS`) are left out, and ``device`` enters as the
        device type that runs it: ``device_type`` (the engine passes the device it trains on),
        else ``device`` resolved on this machine (``auto`` -> ``cuda`` where a GPU is visible).
        """
        return identity_key(self.resolved(), device_type or resolved_device_type(self.device))


def default_model(algorithm: str) -> str:
    """The native architecture of a registered algorithm (its first model family's default spec)."""
    from bpfree.algorithms import get_algorithm

    family = get_algorithm(algorithm).model_families[0]
    return NATIVE_MODELS.get(family, family)


def resolved_device_type(device: str) -> str:
    """``cpu`` or ``cuda`` for a config's device field, resolving ``auto`` on this machine."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def canonical_eval_every(value: Any) -> str | None:
    """``eval_every`` in one spelling ('0.25 epoch', '200 steps'); a whole epoch is the default, null.

    A bare number is refused: 1 would read as one step to some and one epoch to others.
    """
    if value is None:
        return None
    match = _EVAL_EVERY.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"field 'eval_every': expected {EVAL_EVERY_FORMS} (got {value!r})"[:300])
    if match["steps"] is not None:
        steps = int(match["steps"])
        if not 1 <= steps <= MAX_EVAL_EVERY_STEPS:
            raise ValueError(f"field 'eval_every': {steps} steps; expected 1 to {MAX_EVAL_EVERY_STEPS} steps")
        return f"{steps} steps"
    fraction = float(match["fraction"])
    if not 0 < fraction <= 1:
        raise ValueError(f"field 'eval_every': {fraction!r} epoch; expected a fraction of an epoch, 0 < fraction <= 1 (epoch ends are always evaluated)")
    return None if fraction == 1 else f"{fraction!r} epoch"


def parse_eval_every(value: str | None) -> tuple[str, float] | None:
    """A canonical ``eval_every`` as ("epoch", fraction) or ("steps", n); None: epoch ends only."""
    if value is None:
        return None
    number, unit = value.split()
    return ("steps", int(number)) if unit == "steps" else ("epoch", float(number))


def identity(config: dict[str, Any], device_type: str) -> dict[str, Any]:
    """A resolved config reduced to what the run computes, with the device type that ran it."""
    data = {
        k: v for k, v in config.items()
        if k not in NON_IDENTITY_FIELDS and not (k in LATER_FIELD_DEFAULTS and v == LATER_FIELD_DEFAULTS[k])
    }
    data["device"] = device_type
    return data


def identity_key(config: dict[str, Any], device_type: str, length: int = 12) -> str:
    blob = json.dumps(identity(config, device_type), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _refuse_non_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"field '{where}': must be a finite number (got {value!r})")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_non_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_non_finite(v, f"{where}[{i}]")


def _refuse_bools_for_numbers(model_cls: type[BaseModel], values: Any, where: str) -> None:
    """``true`` is not 1: a boolean given for a field that is not declared boolean is refused."""
    if not isinstance(values, dict):
        return
    for name, value in values.items():
        field = model_cls.model_fields.get(name)
        if field is None or not isinstance(value, bool):
            continue
        annotation = field.annotation
        allowed = (annotation,) if isinstance(annotation, type) else getattr(annotation, "__args__", ())
        if bool not in allowed and Any not in allowed and annotation is not Any:
            raise ValueError(f"field '{where}.{name}': expected {_type_name(annotation)}, got a boolean ({value!r})")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _format_validation_error(error: ValidationError, source: str | None = None, prefix: str = "") -> str:
    parts = []
    for item in error.errors():
        location = prefix + (".".join(str(p) for p in item["loc"]) or "config")
        if not location.isprintable():  # keep the message on one line whatever the key holds
            location = location.encode("unicode_escape").decode()
        message = item["msg"].removeprefix("Value error, ")
        if message.startswith("field '"):  # already formatted by a nested validator
            parts.append(message)
            continue
        if item["type"] == "extra_forbidden":
            message = "unknown algorithm parameter" if prefix == "params." else "unknown field"
        elif "input" in item and item["type"] != "missing" and not isinstance(item["input"], dict):
            message = f"{message} (got {item['input']!r})"
        parts.append(f"field '{location}': {message}")
    text = "; ".join(parts)
    return f"{source}: {text}" if source else text


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema's plain scalars instead of YAML 1.1's.

    YAML 1.1 reads ``010`` as 8, ``1:20`` as 80 and ``yes``/``on`` as true; in YAML 1.2 (and here)
    they are 10, the text '1:20' and the text 'yes'. Timestamps stay text.
    """


_Yaml12Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", "<"),
):
    _Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if re.fullmatch(r"0o[0-7]+", text):
        return int(text[2:], 8)
    if re.fullmatch(r"0x[0-9a-fA-F]+", text):
        return int(text[2:], 16)
    if not re.fullmatch(r"[-+]?[0-9]+", text):
        raise yaml.constructor.ConstructorError(None, None, f"invalid integer {text!r}", node.start_mark)
    return int(text, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).lower()
    if text.lstrip("+-") == ".inf":
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"invalid number {text!r}", node.start_mark) from None


def _construct_bool(loader: yaml.SafeLoader, node: yaml.Node) -> bool:
    text = loader.construct_scalar(node).lower()
    if text not in ("true", "false"):
        raise yaml.constructor.ConstructorError(None, None, f"invalid boolean {text!r}", node.start_mark)
    return text == "true"


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)

# A config is a few hundred values; a document that expands (through aliases) to more nodes than
# this is an alias bomb or not a config.
MAX_YAML_NODES = 100_000


class YamlTooLarge(ValueError):
    pass


def _expanded_size(node: yaml.Node) -> int:
    """Nodes the document has once every alias is expanded, counted without expanding them."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(n: yaml.Node) -> int:
        ident = id(n)
        if ident in sizes:
            return sizes[ident]
        if ident in in_progress:
            raise YamlTooLarge("an alias refers to a node that contains it (a recursive document)")
        in_progress.add(ident)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child)
                if total > MAX_YAML_NODES:
                    break
        elif isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                total += size(key) + size(value)
                if total > MAX_YAML_NODES:
                    break
        in_progress.discard(ident)
        if total > MAX_YAML_NODES:
            raise YamlTooLarge(f"expands to more than {MAX_YAML_NODES} values (aliases nested too deep or too often)")
        sizes[ident] = total
        return total

    return size(node)


def load_yaml(text: str) -> Any:
    """One YAML document with YAML 1.2 core scalars; alias bombs raise YamlTooLarge."""
    loader = _Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; malformed input raises ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found (expected a YAML file)")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except YamlTooLarge as exc:
        raise ConfigError(f"config file {path}: refused: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: refused: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def build_config(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a mapping into a RunConfig, turning validation errors into one-line ConfigErrors."""
    try:
        return RunConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """Parse a ``dotted.key=value`` override; the value is read as YAML 1.2 (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. params.schedule=layerwise")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw else ""
    except YamlTooLarge as exc:
        raise ConfigError(f"override {text[:60]!r}: refused: {exc}") from None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return [k for k in key.strip().split(".") if k], value


def set_dotted(values: dict[str, Any], assignments: dict[str, Any] | list[tuple[list[str], Any]]) -> dict[str, Any]:
    """A deep copy of a config mapping with ``{"a.b": value}`` (or ``[(["a", "b"], value)]``) set.

    Intermediate keys that are missing or not mappings become mappings.
    """
    values = json.loads(json.dumps(values, default=str))  # a deep copy of plain data
    pairs = [(key.split("."), v) for key, v in assignments.items()] if isinstance(assignments, dict) else assignments
    for keys, value in pairs:
        if not keys or not all(keys):
            raise ConfigError(f"override {'.'.join(keys)!r}: empty key")
        target = values
        for k in keys[:-1]:
            if not isinstance(target.get(k), dict):
                target[k] = {}
            target = target[k]
        target[keys[-1]] = value
    return values


def apply_assignments(values: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (as on the command line) to a copy of a config mapping."""
    pairs = []
    for text in assignments:
        keys, value = parse_assignment(text)
        if not keys:
            raise ConfigError(f"override {text!r}: empty key")
        pairs.append((keys, value))
    return set_dotted(values, pairs)


def parse_seeds(text: str | int | list[Any] | None, where: str = "--seeds", first: int = 0) -> list[int] | None:
    """Seeds from a count (``3`` -> first, first+1, first+2) or a list (``0,1,2`` / ``[0, 1, 2]``).

    ``None`` stays None (each config's own seed). Every problem is one ConfigError naming ``where``:
    counts and lists are bounded by MAX_SEEDS, seeds by MAX_SEED, duplicates are refused (same-seed
    replicates are not independent).
    """
    if text is None:
        return None
    expected = f"expected a count (3) or a list of distinct seeds (0,1,2), at most {MAX_SEEDS}, each 0..{MAX_SEED}"
    if isinstance(text, bool):
        raise ConfigError(f"{where}: {expected}; got {text!r}")
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not all(re.fullmatch(r"[0-9]{1,10}", p) for p in parts if p) or not any(parts):
            raise ConfigError(f"{where} {text!r}: {expected}")
        numbers = [int(p) for p in parts if p]
        text = numbers[0] if len(numbers) == 1 and "," not in text else numbers
    if isinstance(text, int):
        if not 1 <= text <= MAX_SEEDS:
            raise ConfigError(f"{where}: a count of {text} seeds; {expected}")
        if first < 0 or first + text - 1 > MAX_SEED:
            raise ConfigError(f"{where}: seeds {first}..{first + text - 1}; {expected}")
        return list(range(first, first + text))
    if not isinstance(text, list) or not text or not all(isinstance(s, int) and not isinstance(s, bool) for s in text):
        raise ConfigError(f"{where}: {expected}; got {text!r}"[:300])
    if len(text) > MAX_SEEDS or not all(0 <= s <= MAX_SEED for s in text):
        raise ConfigError(f"{where}: {expected}; got {len(text)} seeds from {min(text)} to {max(text)}")
    if len(set(text)) != len(text):
        raise ConfigError(f"{where}: duplicates in {text!r}; same-seed replicates are not independent"[:300])
    return list(text)


def run_label(cfg: RunConfig) -> str:
    """How a run is named in progress bars and messages: 'mf mlp:2x1000 mnist s0'."""
    return f"{cfg.algorithm} {cfg.model} {cfg.dataset} s{cfg.seed}"


def load_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    assignments: list[str] | None = None,
) -> RunConfig:
    """Load a run config: YAML file (optional), then flag overrides (None values ignored), then key=value pairs."""
    if path is not None:
        from bpfree.configs import resolve

        path = resolve(path)
    values: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    values = dict(values)
    values["params"] = dict(values.get("params") or {}) if isinstance(values.get("params") or {}, dict) else values["params"]
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    values = apply_assignments(values, assignments or [])
    return build_config(values, source=str(path) if path is not None else "config")
