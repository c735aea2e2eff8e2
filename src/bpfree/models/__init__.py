"""Model registry: one architecture definition shared by every algorithm.

A model is a plain ``nn.Module`` exposing ``blocks`` (an ``nn.ModuleList`` of trainable stages) and
``head`` (the classifier BP trains on top). Algorithms attach their own auxiliary parts (MF
projections, CaFo predictors, ...) beside the model, never inside it, so BP and its BP-free twin
train the very same blocks.

Specs are strings: ``mlp:2x1000`` (depth x width), ``mlp:1000,500`` (explicit widths), ``cnn3``
(the 3-block CNN). Further families register a prefix with :func:`register_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from bpfree.data import DataSpec
from bpfree.registry import Registry


@dataclass(frozen=True)
class ModelFamily:
    prefix: str
    parse: Callable[[str], Any]  # argument text after "prefix:" (or "") -> parsed arguments; ValueError if bad
    build: Callable[[Any, DataSpec], nn.Module]
    forms: str  # human-readable accepted forms, for error messages


MODEL_FAMILIES: Registry[ModelFamily] = Registry("model family", plugin_group="bpfree.models")


def register_model(prefix: str, parse: Callable[[str], Any], build: Callable[[Any, DataSpec], nn.Module], forms: str) -> ModelFamily:
    """Add a model family under ``prefix`` (specs ``prefix`` or ``prefix:args``); a taken prefix is refused."""
    if prefix != prefix.strip().lower() or ":" in prefix:
        raise ValueError(f"model family prefix {prefix!r}: expected lower case without ':' or spaces")
    return MODEL_FAMILIES.add(prefix, ModelFamily(prefix, parse, build, forms))


def _split(spec: str) -> tuple[str, str]:
    prefix, _, args = spec.partition(":")
    return prefix.strip().lower(), args.strip()


def parse_model_spec(spec: str) -> tuple[ModelFamily, Any]:
    """(family, parsed arguments) of a spec; a bad spec raises ValueError naming the accepted forms."""
    prefix, args = _split(spec)
    if prefix not in MODEL_FAMILIES:
        shown = repr(spec) if spec.isprintable() else ascii(spec)
        raise ValueError(f"unknown model {shown}; expected one of: {'; '.join(model_names())}")
    family = MODEL_FAMILIES.get(prefix)
    try:
        return family, family.parse(args)
    except ValueError as exc:
        raise ValueError(f"model {spec!r}: {exc}; expected {family.forms}") from None


def build_model(spec: str, data: DataSpec, init: str = "default", algorithm: str | None = None) -> nn.Module:
    """Build the model of ``spec`` for ``data``, initialised by ``init`` for ``algorithm`` (bpfree.models.init)."""
    from bpfree.models.init import apply_init

    family, args = parse_model_spec(spec)
    return apply_init(family.build(args, data), init, algorithm)


def model_names() -> list[str]:
    """The accepted spec forms of every family (for help texts and error messages)."""
    return [family.forms for _, family in MODEL_FAMILIES.items()]


def model_family_names() -> list[str]:
    return MODEL_FAMILIES.names()


# The built-in families (each registers itself on import).
from bpfree.models import cnn, mlp, noprop_net, noprop_time  # noqa: E402,F401
