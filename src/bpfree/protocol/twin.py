"""The BP twin rule: which BP configuration an alternative algorithm is measured against.

One rule serves both sides: ``bpfree compare`` plans twins with it and the report pairs stored
groups with it. A BP configuration is a twin of an alternative when it trains the same network
(``model``) on the same data (``dataset``) on the same device type; among several, the one whose
budget (:data:`BUDGET_FIELDS`) matches the most is the twin. A *derived* twin copies the
alternative's whole budget and takes BP's own optimiser settings (:data:`RECIPE_FIELDS`), so it
matches every budget field.

Epochs are budgeted in passes over the training data (``budget: passes``, the default): the twin's
``epochs`` is the alternative's total over all its phases (CaFo greedy on 3 blocks with 10 epochs
each: 30), see :mod:`bpfree.protocol.budget`; a BP group with that many epochs matches the
alternative's epoch budget. ``budget: epochs`` copies the alternative's per-phase ``epochs``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from bpfree.config import RunConfig, identity, resolved_device_type

BP = "bp"
RECIPE_FIELDS = ("optimizer", "lr", "weight_decay", "momentum")  # BP's own, never copied
SAME_NETWORK_FIELDS = ("dataset", "model", "device")  # a twin must equal these
BUDGET_FIELDS = ("epochs", "batch_size", "patience", "eval_batch_size", "val_fraction")  # the more equal, the better

C = TypeVar("C")


def config_identity(cfg: RunConfig, device_type: str | None = None) -> dict[str, Any]:
    """What ``cfg`` computes, with the device type that runs it (the form twins are compared in)."""
    return identity(cfg.resolved(), device_type or resolved_device_type(cfg.device))


def derive_twin(alternative: dict[str, Any], recipe: dict[str, Any], budget: str = "passes") -> dict[str, Any]:
    """The BP twin of an alternative's config mapping: its network, data and budget, BP's recipe.

    ``budget``: "passes" gives the twin the alternative's total epochs over all phases; "epochs" its ``epochs``.
    """
    from bpfree.protocol.budget import twin_epochs

    twin = {k: v for k, v in alternative.items() if k not in ("params", "name", *RECIPE_FIELDS)}
    twin.update(algorithm=BP, params={}, **recipe)
    twin["epochs"] = twin_epochs(alternative, budget)
    return twin


def bp_twin(cfg: RunConfig, recipe: dict[str, Any] | None = None, budget: str = "passes") -> RunConfig:
    """The derived BP twin of a validated config (``recipe``: BP's optimiser settings, default the RunConfig defaults)."""
    from bpfree.config import build_config

    defaults = {name: RunConfig.model_fields[name].default for name in RECIPE_FIELDS}
    twin = derive_twin(cfg.model_dump(mode="json"), {**defaults, **(recipe or {})}, budget)
    return build_config(twin, source=f"BP twin of {cfg.algorithm}")


def twin_key(config: dict[str, Any]) -> str:
    """Equal for an alternative and every possible twin: the network, the data and the device type."""
    blob = json.dumps({f: config.get(f) for f in SAME_NETWORK_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def twin_score(alternative: dict[str, Any], candidate: dict[str, Any]) -> int | None:
    """How well ``candidate`` (an identity mapping) serves as ``alternative``'s twin; None: it is no twin."""
    if candidate.get("algorithm") != BP or twin_key(candidate) != twin_key(alternative):
        return None
    score = sum(candidate.get(f) == alternative.get(f) for f in BUDGET_FIELDS)
    if candidate.get("epochs") != alternative.get("epochs") and candidate.get("epochs") == passes(alternative):
        score += 1  # the alternative's epoch budget in passes over the data
    return score


def passes(config: dict[str, Any]) -> int | None:
    """The most passes over the training data an (identity) config mapping allows; None if unknown here."""
    from bpfree.protocol.budget import total_epochs

    fields = set(RunConfig.model_fields)
    try:
        return total_epochs({k: v for k, v in config.items() if k in fields and k != "device"})
    except Exception:  # written by another version, or an algorithm not registered here
        return None


def choose_twin(
    alternative: dict[str, Any],
    candidates: Sequence[C],
    config_of: Callable[[C], dict[str, Any]],
    tiebreak: Callable[[C], tuple[Any, ...]] = lambda c: (),
) -> C | None:
    """The best twin among ``candidates`` (ties: ``tiebreak``, then the first); None if none qualifies."""
    scored = [(score, tiebreak(c), -i, c) for i, c in enumerate(candidates) if (score := twin_score(alternative, config_of(c))) is not None]
    if not scored:
        return None
    return max(scored, key=lambda item: item[:3])[3]
