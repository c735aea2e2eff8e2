"""Run configuration: a validated, frozen pydantic model loaded from YAML and/or CLI flags.

Precedence: code defaults < YAML file < CLI flags. Unknown keys are errors, and every error is
reported as one line naming the field and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from bpfree.errors import ConfigError

# Fields that say where or how to store a run, not what the run is; they do not enter the run's key.
_NON_IDENTITY_FIELDS = ("output", "data_root", "download", "name")


class RunConfig(BaseModel):
    """Everything that defines one training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: str = Field("bp", description="training algorithm (see `bpfree list`)")
    dataset: str = Field("mnist5k", description="dataset name (see `bpfree list`)")
    model: str = Field("mlp:2x1000", description="architecture, e.g. mlp:2x1000, cnn3, noprop:10")
    epochs: int = Field(10, ge=1, le=100_000, description="maximum epochs (per phase for phased algorithms)")
    batch_size: int = Field(128, ge=1, le=1_000_000)
    eval_batch_size: int = Field(1000, ge=1, le=1_000_000)
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    patience: int | None = Field(10, ge=1, description="early-stopping patience in epochs on validation accuracy; null disables")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_root: Path | None = Field(None, description="directory holding torchvision datasets")
    download: bool = Field(False, description="let torchvision download missing datasets")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="validation share of the training set (not MNIST: fixed 50k/10k)")
    amp: bool = Field(False, description="bf16 autocast for training and evaluation steps (meant for GPUs)")
    channels_last: bool = Field(False, description="channels-last memory format for images and conv weights")
    compile: bool = Field(False, description="torch.compile each model block (first epoch includes compile time)")
    divergence_factor: float | None = Field(
        1000.0, gt=1, le=1e12, description="a phase diverges when its epoch loss exceeds this multiple of its first-step loss; null disables"
    )
    cuda_graphs: bool = Field(True, description="on CUDA, replay each training step from a captured CUDA graph (no effect on CPU)")
    checkpoint: bool = Field(True, description="write a resumable checkpoint after every epoch")
    output: Path = Field(Path("results"), description="results directory; each run writes <output>/<run_id>/")
    name: str | None = Field(None, description="free-form label stored with the result")
    params: dict[str, Any] = Field(default_factory=dict, description="algorithm-specific hyperparameters")

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        from bpfree.algorithms import algorithm_names

        names = algorithm_names()
        if value not in names:
            raise ValueError(f"unknown algorithm {value!r}; choose one of {', '.join(names)}")
        return value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from bpfree.data import dataset_names

        names = dataset_names()
        if value not in names:
            raise ValueError(f"unknown dataset {value!r}; choose one of {', '.join(names)}")
        return value

    @field_validator("model")
    @classmethod
    def _parsable_model(cls, value: str) -> str:
        from bpfree.models import parse_model_spec

        parse_model_spec(value)  # raises ValueError with the accepted forms
        return value

    @field_validator("params")
    @classmethod
    def _valid_algorithm_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from bpfree.algorithms import get_algorithm

        algorithm = info.data.get("algorithm")
        if algorithm is None:  # the algorithm itself was invalid; that error is reported instead
            return value
        try:
            get_algorithm(algorithm).Params.model_validate(value)
        except ValidationError as exc:
            raise ValueError(_format_validation_error(exc, prefix="params.")) from None
        return value

    def algorithm_params(self) -> BaseModel:
        """The algorithm's own hyperparameters, validated, with defaults filled in."""
        from bpfree.algorithms import get_algorithm

        return get_algorithm(self.algorithm).Params.model_validate(self.params)

    def resolved(self) -> dict[str, Any]:
        """The full config as plain JSON types, algorithm defaults included."""
        data = self.model_dump(mode="json")
        data["params"] = self.algorithm_params().model_dump(mode="json")
        return data

    def key(self) -> str:
        """A stable hash of what defines the run (not where it is stored); equal keys mean the same run."""
        data = self.resolved()
        for field in _NON_IDENTITY_FIELDS:
            data.pop(field, None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


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


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; malformed input raises ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found (expected a YAML file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    """Parse a ``dotted.key=value`` override; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. params.schedule=layerwise")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return [k for k in key.strip().split(".") if k], value


def apply_assignments(values: dict[str, Any], assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (as on the command line) to a copy of a config mapping."""
    values = json.loads(json.dumps(values, default=str))  # a deep copy of plain data
    for text in assignments:
        keys, value = parse_assignment(text)
        if not keys:
            raise ConfigError(f"override {text!r}: empty key")
        target = values
        for k in keys[:-1]:
            if not isinstance(target.get(k), dict):
                target[k] = {}
            target = target[k]
        target[keys[-1]] = value
    return values


def load_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    assignments: list[str] | None = None,
) -> RunConfig:
    """Load a run config: YAML file (optional), then flag overrides (None values ignored), then key=value pairs."""
    values: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    values = dict(values)
    values["params"] = dict(values.get("params") or {}) if isinstance(values.get("params") or {}, dict) else values["params"]
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    values = apply_assignments(values, assignments or [])
    return build_config(values, source=str(path) if path is not None else "config")
