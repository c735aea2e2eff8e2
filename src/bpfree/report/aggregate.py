"""From stored results to numbers: groups of seeds, means with 95% CIs, and paired deltas against BP.

A *group* is every run of one configuration that differs only in its seed. A *pair* is an
alternative algorithm's group next to its BP twin: the BP group on the same dataset and model
whose budget (epochs, batch size, patience, ...) matches best. Everything here is computed from
result records alone, so ``bpfree report`` and ``bpfree compare`` print the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bpfree.config import identity

COST_METRICS = ("train_time_s", "energy_j", "peak_memory_bytes", "train_flops")
BASELINE = "bp"


@dataclass(frozen=True)
class Stat:
    """Mean and two-sided 95% confidence interval (Student t) of n values."""

    n: int
    mean: float | None
    std: float | None
    half_width: float | None  # None when n < 2

    @property
    def low(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean + self.half_width


def t_interval(values: Iterable[float | None], confidence: float = 0.95) -> Stat:
    """Mean ± t_{(1+c)/2, n-1} · s/√n over the non-null values."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Stat(0, None, None, None)
    mean = sum(xs) / n
    if n < 2:
        return Stat(1, mean, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Stat(n, mean, std, half)


def device_type_of(result: dict[str, Any]) -> str:
    """The device type a stored run trained on (its environment's device; else its config's)."""
    device = (result.get("environment") or {}).get("device")
    if isinstance(device, str) and device:
        return device.split(":", 1)[0]
    configured = (result.get("config") or {}).get("device")
    return configured if isinstance(configured, str) and configured != "auto" else "unknown"


def group_config(result: dict[str, Any]) -> dict[str, Any]:
    """The run's identity (as in its key: no storage fields, the device type that ran) without its seed."""
    config = identity(result.get("config") or {}, device_type_of(result))
    config.pop("seed", None)
    return config


def group_key(result: dict[str, Any]) -> str:
    """Equal for runs that differ only in their seed (the run key's rule, seed left out)."""
    blob = json.dumps(group_config(result), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class Group:
    """Replicates (seeds) of one configuration."""

    key: str
    algorithm: str
    dataset: str
    model: str
    config: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""

    @property
    def completed(self) -> list[dict[str, Any]]:
        """Completed runs, one per seed: a repeated seed is no independent replicate (see duplicate_seeds)."""
        seen: set[Any] = set()
        unique = []
        for r in self.runs:
            if r.get("status") == "completed" and r.get("seed") not in seen:
                seen.add(r.get("seed"))
                unique.append(r)
        return unique

    @property
    def duplicate_seeds(self) -> list[int]:
        """Seeds with more than one run in the group; only the first run of each counts in statistics."""
        counts: dict[Any, int] = {}
        for r in self.runs:
            counts[r.get("seed")] = counts.get(r.get("seed"), 0) + 1
        return sorted(seed for seed, n in counts.items() if n > 1)

    @property
    def diverged(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r.get("status") == "diverged"]

    @property
    def seeds(self) -> list[int]:
        return [int(r["seed"]) for r in self.runs]

    @property
    def is_baseline(self) -> bool:
        return self.algorithm == BASELINE

    def stat(self, metric: str) -> Stat:
        """A metric over completed runs (diverged runs have no test accuracy and are counted apart)."""
        return t_interval(r.get(metric) for r in self.completed)

    def energy_note(self) -> tuple[str | None, str | None]:
        """(method, reason-when-null) across the group's runs."""
        methods = sorted({r["energy_method"] for r in self.runs if r.get("energy_j") is not None and r.get("energy_method")})
        reasons = sorted({r.get("energy_reason") or "no reason recorded" for r in self.runs if r.get("energy_j") is None})
        return ("; ".join(methods) or None, "; ".join(reasons) or None)

    def memory_method(self) -> str | None:
        methods = sorted({r["memory_method"] for r in self.runs if r.get("memory_method")})
        return "; ".join(methods) or None


def _variant(config: dict[str, Any]) -> str:
    params = config.get("params") or {}
    for name in ("variant", "schedule", "mode"):
        if isinstance(params.get(name), str):
            return params[name]
    return ""


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in config.items() if k != "params"}
    flat.update({f"params.{k}": v for k, v in (config.get("params") or {}).items()})
    return flat


def group_results(results: Iterable[dict[str, Any]]) -> list[Group]:
    """Group results by configuration (ignoring seed); deterministic order: dataset, model, BP first."""
    groups: dict[str, Group] = {}
    for r in results:
        key = group_key(r)
        if key not in groups:
            groups[key] = Group(key, r.get("algorithm", "?"), r.get("dataset", "?"), r.get("model", "?"), group_config(r))
        groups[key].runs.append(r)
    ordered = sorted(
        groups.values(),
        key=lambda g: (g.dataset, g.model, not g.is_baseline, g.algorithm, _variant(g.config), g.config.get("epochs", 0), g.key),
    )
    for g in ordered:
        g.runs.sort(key=lambda r: (r.get("seed", 0), r.get("run_id", "")))
    _assign_labels(ordered)
    return ordered


def _assign_labels(groups: list[Group]) -> None:
    """Short unique labels ('mf mlp:2x256 mnist5k'), extended by the settings that tell groups apart."""
    base: dict[str, list[Group]] = {}
    for g in groups:
        variant = _variant(g.config)
        name = f"{g.algorithm}-{variant}" if variant and not g.is_baseline else g.algorithm
        base.setdefault(f"{name} {g.model} {g.dataset}", []).append(g)
    for label, members in base.items():
        if len(members) == 1:
            members[0].label = label
            continue
        flats = [_flat(g.config) for g in members]
        keys = sorted({k for f in flats for k in f})
        differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
        for g, f in zip(members, flats):
            extra = " ".join(f"{k.removeprefix('params.')}={f.get(k)}" for k in differing[:2])
            g.label = f"{label} {extra}".strip() if extra else f"{label} [{g.key[:6]}]"
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.label] = seen.get(g.label, 0) + 1
    for g in groups:
        if seen[g.label] > 1:
            g.label = f"{g.label} [{g.key[:6]}]"


@dataclass
class Pair:
    """An alternative's group and its BP twin (None when no BP group matches)."""

    alternative: Group
    baseline: Group | None


def find_twin(group: Group, groups: Sequence[Group]) -> Group | None:
    """The BP twin group by the twin rule (:mod:`bpfree.protocol.twin`), as compare planned it.

    Ties go to the group sharing more completed seeds with the alternative, then to the one with
    more completed runs (a BP recipe that always diverged is no baseline), then to the first.
    """
    from bpfree.protocol.twin import choose_twin

    alt_seeds = {r.get("seed") for r in group.completed}

    def tiebreak(g: Group) -> tuple[int, int]:
        return len(alt_seeds & {r.get("seed") for r in g.completed}), len(g.completed)

    return choose_twin(group.config, [g for g in groups if g.is_baseline], lambda g: g.config, tiebreak)


def epoch_budget(group: Group) -> int | None:
    """The group's cap on passes over the training data: the sum of its phases' epochs."""
    from bpfree.protocol.twin import passes

    return passes(group.config)


def find_pairs(groups: Sequence[Group]) -> list[Pair]:
    return [Pair(g, find_twin(g, groups)) for g in groups if not g.is_baseline]


@dataclass(frozen=True)
class Delta:
    """An alternative against its BP twin, from the stored per-seed results."""

    accuracy_pp: float | None  # mean(alt) − mean(bp), percentage points
    relative_pct: dict[str, float | None]  # cost metric -> (mean(alt) / mean(bp) − 1) · 100
    paired_n: int  # seeds with a completed run in both groups
    paired_seeds: tuple[int, ...]
    paired_mean_pp: float | None  # mean of per-seed differences (pp)
    paired_half_width_pp: float | None
    p_value: float | None  # paired t-test on test accuracy; None when n < 2 or undefined
    p_note: str  # why p is missing, or ""
    effect_dz: float | None = None  # paired Cohen's d_z: mean difference / sd of the differences
    effect_dz_low: float | None = None  # its approximate 95% CI (see paired_effect_size)
    effect_dz_high: float | None = None
    ci_method: str = "t"  # how the paired mean difference's CI was formed: t or bootstrap
    paired_low_pp: float | None = None
    paired_high_pp: float | None = None
    holm_p_value: float | None = None  # p adjusted by Holm across the alternatives of one comparison


def _relative(alt: float | None, base: float | None) -> float | None:
    if alt is None or base is None or base == 0:
        return None
    return (alt / base - 1.0) * 100.0


def _paired_test(a: list[float], b: list[float]) -> tuple[float | None, str]:
    from scipy import stats

    if len(a) < 2:
        return None, "n/a (n<2)"
    diffs = [x - y for x, y in zip(a, b)]
    if all(d == diffs[0] for d in diffs):
        return None, "n/a (identical differences)"
    p = float(stats.ttest_rel(a, b).pvalue)
    return (p, "") if math.isfinite(p) else (None, "n/a")


def paired_effect_size(diffs: Sequence[float], confidence: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """Cohen's d_z of paired differences, with the normal-approximation CI d ± z·sqrt(1/n + d²/(2n)).

    (The large-sample standard error of a standardised mean; with n = 3 it is rough, and the report
    says so by printing n beside it.) None when n < 2 or the differences do not vary.
    """
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return None, None, None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return None, None, None
    d = mean / sd
    half = float(stats.norm.ppf((1 + confidence) / 2)) * math.sqrt(1 / n + d * d / (2 * n))
    return d, d - half, d + half


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 9999, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of the mean (scipy.stats.bootstrap), reproducible by ``seed``."""
    from scipy import stats

    if len(values) < 2 or len(set(values)) < 2:
        return None, None
    res = stats.bootstrap((list(values),), lambda x, axis: x.mean(axis=axis), confidence_level=confidence,
                          n_resamples=resamples, method="percentile", random_state=seed)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None entries stay None and do not count in the family)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(order)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def compare_pair(pair: Pair, ci: str = "t") -> Delta | None:
    alt, bp = pair.alternative, pair.baseline
    if bp is None:
        return None
    acc_alt, acc_bp = alt.stat("test_accuracy").mean, bp.stat("test_accuracy").mean
    accuracy_pp = None if acc_alt is None or acc_bp is None else (acc_alt - acc_bp) * 100.0
    relative = {m: _relative(alt.stat(m).mean, bp.stat(m).mean) for m in COST_METRICS}
    by_seed_alt = {r["seed"]: r for r in alt.completed}
    by_seed_bp = {r["seed"]: r for r in bp.completed}
    seeds = tuple(sorted(set(by_seed_alt) & set(by_seed_bp)))
    a = [by_seed_alt[s]["test_accuracy"] for s in seeds]
    b = [by_seed_bp[s]["test_accuracy"] for s in seeds]
    pp = [(x - y) * 100.0 for x, y in zip(a, b)]
    diffs = t_interval(pp)
    p, note = _paired_test(a, b)
    dz, dz_low, dz_high = paired_effect_size(pp)
    low, high = (diffs.low, diffs.high) if ci == "t" else bootstrap_interval(pp)
    return Delta(accuracy_pp, relative, len(seeds), seeds, diffs.mean, diffs.half_width, p, note,
                 dz, dz_low, dz_high, ci, low, high)


@dataclass
class Summary:
    groups: list[Group]
    pairs: list[Pair]
    deltas: dict[str, Delta | None]  # alternative group key -> delta
    results: list[dict[str, Any]]


CI_METHODS = ("t", "bootstrap")


def summarize(results: Sequence[dict[str, Any]], ci: str = "t") -> Summary:
    """Groups, pairs and deltas; p-values Holm-adjusted across every alternative of the comparison.

    ``ci``: "t" (Student t) or "bootstrap" (percentile bootstrap) for the paired mean difference.
    """
    if ci not in CI_METHODS:
        raise ValueError(f"unknown CI method {ci!r}; choose one of {', '.join(CI_METHODS)}")
    groups = group_results(results)
    pairs = find_pairs(groups)
    deltas = {p.alternative.key: compare_pair(p, ci) for p in pairs}
    present = {k: d for k, d in deltas.items() if d is not None}
    for (key, delta), adjusted in zip(present.items(), holm([d.p_value for d in present.values()])):
        deltas[key] = replace(delta, holm_p_value=adjusted)
    return Summary(groups, pairs, deltas, list(results))


def environments(results: Sequence[dict[str, Any]]) -> list[tuple[str, list[tuple[str, int]]]]:
    """Every environment field with its distinct values and how many runs had each."""
    fields: dict[str, dict[str, int]] = {}
    for r in results:
        for key, value in (r.get("environment") or {}).items():
            text = "—" if value is None else str(value)
            fields.setdefault(key, {})
            fields[key][text] = fields[key].get(text, 0) + 1
    return [(k, sorted(v.items(), key=lambda kv: -kv[1])) for k, v in fields.items()]


def declared_deviations(results: Sequence[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """(algorithm, paper, deviations) for every algorithm in the results."""
    seen: dict[str, tuple[str, list[str]]] = {}
    for r in results:
        name = r.get("algorithm", "?")
        if name not in seen:
            seen[name] = (r.get("paper") or "", list(r.get("deviations") or []))
    return [(name, paper, devs) for name, (paper, devs) in sorted(seen.items(), key=lambda kv: (kv[0] != BASELINE, kv[0]))]
