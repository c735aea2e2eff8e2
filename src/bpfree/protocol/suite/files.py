"""The suite file format: a grid of configs x seeds with overrides, read and checked into RunConfigs.

Suite file (YAML)::

    output: results/paper          # optional; --output overrides
    seeds: [0, 1, 2]               # or a count (3 -> 0, 1, 2); omitted: each config's own seed
    overrides: {device: auto}      # optional, applied to every config
    configs:
      - bp_mnist_mlp_2x1000.yaml   # a path, relative to the suite file
      - path: mf_mnist_mlp_2x1000.yaml
        overrides: {epochs: 5}     # per-entry overrides
      - {algorithm: bp, model: "mlp:1x64", epochs: 2}   # an inline config
    slurm: {partition: gpu, time_min: 120, gpus: 1}   # optional defaults for --executor slurm
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfree.config import RunConfig, apply_assignments, build_config, parse_seeds, read_yaml_mapping
from bpfree.errors import ConfigError, UserError

SUITE_KEYS = ("configs", "seeds", "overrides", "output", "slurm")
ENTRY_KEYS = ("path", "overrides")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; nested mappings (``params``) merge, everything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_config_path(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    beside = base / path
    return beside if beside.exists() or not path.exists() else path


@dataclass
class SuiteEntry:
    source: str  # where the config came from, for messages
    values: dict[str, Any]


@dataclass
class Suite:
    path: Path | None
    entries: list[SuiteEntry]
    seeds: list[int] | None
    output: Path | None
    slurm: dict[str, Any] = field(default_factory=dict)


def _seeds(value: Any, where: str) -> list[int] | None:
    if isinstance(value, str):  # a YAML text such as "0,1" is not a seed list
        raise UserError(f"{where}: 'seeds' must be a list of distinct integers >= 0 or a count, got {value!r}")
    return parse_seeds(value, f"{where}: 'seeds'")


def load_suite(path: Path) -> Suite:
    """Read and check a suite file; every problem is one UserError line naming the file and entry."""
    from bpfree.configs import resolve

    path = resolve(path)
    where = f"suite file {path}"
    if not path.is_file():
        raise UserError(f"{where}: not found")
    try:
        data = read_yaml_mapping(path)
    except ConfigError as exc:
        raise UserError(str(exc).replace(f"config file {path}", where, 1)) from None
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SUITE_KEYS)}")
    configs = data.get("configs")
    if not isinstance(configs, list) or not configs:
        raise UserError(f"{where}: 'configs' must be a non-empty list of config paths or inline configs")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{where}: 'overrides' must be a mapping of field: value")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise UserError(f"{where}: 'slurm' must be a mapping (partition, account, gpus, time_min, cpus, mem_gb)")
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        raise UserError(f"{where}: 'output' must be a path")
    entries = []
    for i, item in enumerate(configs):
        label = f"{where}: configs[{i}]"
        entry_overrides: dict[str, Any] = {}
        if isinstance(item, dict) and "path" in item:
            extra = sorted(set(item) - set(ENTRY_KEYS))
            if extra:
                raise UserError(f"{label}: unknown key(s) {', '.join(map(repr, extra))} beside 'path'; allowed: {', '.join(ENTRY_KEYS)}")
            entry_overrides = item.get("overrides") or {}
            if not isinstance(entry_overrides, dict):
                raise UserError(f"{label}: 'overrides' must be a mapping")
            item = item["path"]
        if isinstance(item, str):
            config_path = _resolve_config_path(item, path.parent)
            if not config_path.is_file():
                raise UserError(f"{label}: config file {item} not found (looked in {path.parent} and the current directory)")
            try:
                values = read_yaml_mapping(config_path)
            except ConfigError as exc:
                raise UserError(f"{label}: {exc}") from None
            source = str(config_path)
        elif isinstance(item, dict):
            values, source = dict(item), f"{path.name} configs[{i}] (inline)"
        else:
            raise UserError(f"{label}: expected a config path or an inline config mapping, got {type(item).__name__}")
        entries.append(SuiteEntry(source, deep_merge(deep_merge(values, overrides), entry_overrides)))
    return Suite(path, entries, _seeds(data.get("seeds"), where), Path(output) if output else None, slurm)


def expand(
    entries: Sequence[SuiteEntry],
    seeds: Sequence[int] | None,
    output: Path,
    assignments: Sequence[str] = (),
) -> list[RunConfig]:
    """Configs x seeds as validated RunConfigs writing to ``output``; duplicates (same key) dropped."""
    configs: list[RunConfig] = []
    seen: set[str] = set()
    for entry in entries:
        values = apply_assignments(entry.values, assignments)
        for seed in seeds if seeds is not None else [values.get("seed", 0)]:
            cfg = build_config({**values, "seed": seed, "output": str(output)}, source=entry.source)
            if cfg.key() not in seen:
                seen.add(cfg.key())
                configs.append(cfg)
    return configs
