"""Models register by name; ``build_model`` makes one from a feature map and parameters."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from torch import nn

from ctrserve.contract.feature_map import FeatureMap

MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        MODELS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def _import_zoo() -> None:
    from . import zoo

    for mod in pkgutil.iter_modules(zoo.__path__):
        importlib.import_module(f"{zoo.__name__}.{mod.name}")


def list_models() -> list[str]:
    _import_zoo()
    return sorted(MODELS)


def build_model(name: str, feature_map: FeatureMap, params: dict[str, Any] | None = None) -> nn.Module:
    _import_zoo()
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](feature_map, **(params or {}))
    except TypeError as exc:
        raise ValueError(f"bad parameters for model {name!r}: {exc}") from None
