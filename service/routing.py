"""A/B routing: a YAML config of experiments and arms; users are assigned to arms by a salted hash.

    experiments:
      - name: ranking-2026q1
        salt: ranking-2026q1        # change the salt to reshuffle users
        arms:
          - {name: control,   model: deepfm, version: 1, weight: 90}
          - {name: treatment, model: dcnv2,  version: 1, weight: 10}
    default: ranking-2026q1         # optional; the first experiment otherwise

``bucket = sha256(salt NUL user_id)[:8] mod 10,000``: a pure function of the config and the user,
so a user sticks to an arm across restarts and replicas. Arms own contiguous bucket ranges in
config order; weights are percentages with at most two decimals (one bucket = 0.01 %) summing to
100. A parsed config is immutable; ``Router`` is swapped as a whole by the gateway on reload.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ctrserve.validation import describe

BUCKETS = 10_000
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"


class RoutingError(ValueError):
    """A routing config that cannot take effect, with the reason."""


class NotFound(LookupError):
    """A model, version, experiment or arm the current config does not serve (HTTP 404)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arm(_Frozen):
    name: str = Field(pattern=_NAME)
    model: str = Field(pattern=_NAME)
    version: int = Field(ge=1)
    weight: float = Field(ge=0, le=100, allow_inf_nan=False)

    @field_validator("weight")
    @classmethod
    def _two_decimals(cls, w: float) -> float:
        if abs(w * 100 - round(w * 100)) > 1e-6:
            raise ValueError(f"weight {w} is finer than one bucket (0.01 %)")
        return w

    @property
    def key(self) -> tuple[str, int]:
        return (self.model, self.version)


class Experiment(_Frozen):
    name: str = Field(pattern=_NAME)
    salt: str = Field(min_length=1, max_length=256)
    arms: list[Arm] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_arms(self) -> Experiment:
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"experiment {self.name!r}: duplicate arm names {dup}")
        total = sum(round(a.weight * 100) for a in self.arms)
        if total != BUCKETS:
            raise ValueError(f"experiment {self.name!r}: arm weights sum to {total / 100:g} %, not 100 %")
        return self


class RoutingConfig(_Frozen):
    experiments: list[Experiment] = Field(min_length=1)
    default: str | None = None

    @model_validator(mode="after")
    def _check(self) -> RoutingConfig:
        names = [e.name for e in self.experiments]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate experiment names {dup}")
        if self.default is not None and self.default not in names:
            raise ValueError(f"default experiment {self.default!r} is not one of {names}")
        return self

    @property
    def default_experiment(self) -> str:
        return self.default or self.experiments[0].name

    def models(self) -> set[tuple[str, int]]:
        """Every (model, version) some arm references: all must be ready before the config applies."""
        return {a.key for e in self.experiments for a in e.arms}


def parse_config(raw: Any, source: str = "<routing>") -> RoutingConfig:
    """A YAML document (already loaded) -> RoutingConfig, or RoutingError naming every problem."""
    if not isinstance(raw, dict):
        raise RoutingError(f"{source}: a routing config is a mapping with `experiments`, got {type(raw).__name__}")
    try:
        return RoutingConfig.model_validate(raw)
    except ValidationError as exc:
        raise RoutingError(f"{source}: invalid routing config: {describe(exc)}") from None


def parse_yaml(text: str | bytes, source: str = "<routing>") -> RoutingConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RoutingError(f"{source}: not valid YAML: {exc}") from None
    return parse_config(raw, source)


def load_config(path: Path) -> RoutingConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RoutingError(f"cannot read routing config {path}: {exc.strerror or exc}") from None
    return parse_yaml(text, str(path))


def single_arm_config(model: str, version: int) -> RoutingConfig:
    """The config used when none is given: all traffic to one model version."""
    return RoutingConfig(experiments=[Experiment(
        name="default", salt="default", arms=[Arm(name="default", model=model, version=version, weight=100)])])


def bucket(salt: str, user_id: str) -> int:
    """The user's bucket in [0, 10,000): stable across processes (no Python ``hash`` seed)."""
    digest = hashlib.sha256(salt.encode() + b"\x00" + user_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Route:
    experiment: str
    arm: str
    model: str
    version: int
    bucket: int | None  # None when forced by header or chosen by the request's `model`

    @property
    def key(self) -> tuple[str, int]:
        return self.model, self.version


@dataclass(frozen=True)
class Overrides:
    """What a request says about its own route: ``model`` (the body's field, ``name`` or
    ``name:version``) bypasses the split; ``experiment`` and ``arm`` (QA headers) pick an
    experiment and force an arm in it."""

    model: str | None = None
    experiment: str | None = None
    arm: str | None = None


DIRECT_ARM = "direct"


class Router:
    """An immutable routing table built from a validated config."""

    def __init__(self, config: RoutingConfig):
        self.config = config
        self._arms: dict[str, dict[str, Arm]] = {}
        self._bounds: dict[str, tuple[list[int], list[Arm]]] = {}
        for exp in config.experiments:
            self._arms[exp.name] = {a.name: a for a in exp.arms}
            upper, arms, acc = [], [], 0
            for a in exp.arms:
                width = round(a.weight * 100)
                if width == 0:
                    continue  # a 0 % arm is reachable only through the override header
                acc += width
                upper.append(acc)
                arms.append(a)
            self._bounds[exp.name] = (upper, arms)
        self._salts = {e.name: e.salt for e in config.experiments}
        self._versions: dict[str, list[int]] = {}
        for model, version in sorted(config.models()):
            self._versions.setdefault(model, []).append(version)

    def assign(self, user_id: str, experiment: str | None = None, arm: str | None = None) -> Route:
        """The arm for ``user_id`` in ``experiment`` (default if None); ``arm`` forces one by name."""
        exp = experiment or self.config.default_experiment
        if exp not in self._arms:
            raise NotFound(f"unknown experiment {exp!r}; known: {sorted(self._arms)}")
        if arm is not None:
            a = self._arms[exp].get(arm)
            if a is None:
                raise NotFound(f"experiment {exp!r} has no arm {arm!r}; arms: {list(self._arms[exp])}")
            return Route(exp, a.name, a.model, a.version, None)
        b = bucket(self._salts[exp], user_id)
        upper, arms = self._bounds[exp]
        a = arms[bisect_right(upper, b)]
        return Route(exp, a.name, a.model, a.version, b)

    def route(self, user_id: str, overrides: Overrides) -> Route:
        """The request's route: the model it names, else its arm in the split (raises NotFound)."""
        if overrides.model:
            return self.direct(overrides.model)
        return self.assign(user_id, overrides.experiment, overrides.arm)

    def direct(self, spec: str) -> Route:
        """Route by the request's ``model`` field: ``name`` (newest served version) or ``name:version``."""
        name, _, ver = spec.partition(":")
        versions = self._versions.get(name)
        if not versions:
            raise NotFound(f"model {name!r} is not served; served models: {sorted(self._versions)}")
        if not ver:
            return Route(DIRECT_ARM, DIRECT_ARM, name, versions[-1], None)
        if not ver.isdigit() or int(ver) not in versions:
            raise NotFound(f"model {name!r} has no served version {ver!r}; served versions: {versions}")
        return Route(DIRECT_ARM, DIRECT_ARM, name, int(ver), None)
