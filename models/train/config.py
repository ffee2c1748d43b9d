"""Run configuration: YAML blocks merged in order, FuxiCTR-style.

``configs/base.yaml`` ``Base`` -> ``base.yaml`` ``<dataset>`` -> ``configs/<model>.yaml``
``Base`` -> ``<model>.yaml`` ``<dataset>`` -> ``--config FILE`` -> ``--set key=value``.
Each block has ``train:`` (the trainer's settings) and ``model:`` (the model's parameters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(4096, ge=1)
    #: each batch's forward/backward in this many slices, gradients summed before the one optimiser
    #: step: the same step for less memory (BatchNorm then sees slice statistics)
    micro_batches: int = Field(1, ge=1)
    eval_batch_size: int = Field(16384, ge=1)
    lr: float = Field(1e-3, gt=0)
    #: FuxiCTR-style L2 on every embedding table: loss += reg/2 * ||W||^2 per step
    embedding_reg: float = Field(0.0, ge=0)
    #: L2 on the other weights (Adam weight decay)
    net_reg: float = Field(0.0, ge=0)
    max_epochs: int = Field(30, ge=1)
    #: epochs without a better valid AUC before stopping; the lr is cut on each such epoch
    patience: int = Field(2, ge=1)
    lr_decay: float = Field(0.1, gt=0, le=1)
    #: before this epoch a non-improving valid epoch neither cuts the lr nor counts toward patience
    #: (0: from the first epoch on)
    min_epochs: int = Field(0, ge=0)
    threads: int = Field(0, ge=0)  # 0: torch default
    #: cap on training rows (0 = all); for smoke runs
    max_train_rows: int = Field(0, ge=0)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    #: the dataset's name (spec), which also picks the per-dataset config blocks
    dataset: str
    variant: str = "default"
    seed: int = 2026
    train: TrainSettings = TrainSettings()
    params: dict[str, Any] = {}
    #: the loader overrides the data was prepared with (``--data-set``); part of the dataset identity
    data: dict[str, Any] = {}

    @property
    def dataset_id(self) -> str:
        """The dataset as prepared: ``amazon_sports-categoryBeauty`` (the prepared folder's name);
        the plain name without overrides. Run folders, plots and result records carry it."""
        from ..data.prepare import dataset_identity

        return dataset_identity(self.dataset, self.data)

    def dataset_record(self) -> dict[str, Any]:
        """The dataset fields of a metrics record: its identity, and the overrides when there are any."""
        return {"dataset": self.dataset_id, **({"data_overrides": dict(self.data)} if self.data else {})}


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _blocks(path: Path, dataset: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    doc = yaml.safe_load(path.read_text()) or {}
    return [doc.get("Base") or {}, doc.get(dataset) or {}]


#: the only words read as booleans: YAML 1.1 also reads on/off/yes/no as booleans, which would
#: turn ``semantic_ids.mode=off`` into ``False``
BOOLEAN_WORDS = ("true", "false")


def _scalar(value: str) -> Any:
    parsed = yaml.safe_load(value)
    if isinstance(parsed, bool) and value.strip().lower() not in BOOLEAN_WORDS:
        return value.strip()
    return parsed


def parse_set(items: list[str]) -> dict[str, Any]:
    """``a.b=1`` -> ``{"a": {"b": 1}}``; values parsed as YAML scalars/lists (only true/false as
    booleans: ``mode=off`` is the string ``off``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _scalar(value)
    return out


def resolve_config(
    model: str,
    dataset: str,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int | None = None,
    variant: str | None = None,
    data: dict[str, Any] | None = None,
) -> RunConfig:
    merged: dict[str, Any] = {}
    blocks = _blocks(CONFIG_DIR / "base.yaml", dataset) + _blocks(CONFIG_DIR / f"{model}.yaml", dataset)
    if config_file is not None:
        doc = yaml.safe_load(Path(config_file).read_text()) or {}
        blocks += [doc.get("Base") or {}, doc.get(dataset) or {}] if "Base" in doc else [doc]
    blocks.append(overrides or {})
    for block in blocks:
        merged = _deep_merge(merged, block)
    train = merged.get("train", {})
    params = merged.get("model", {})
    extra = set(merged) - {"train", "model"}
    if extra:
        raise ValueError(f"config blocks take only 'train' and 'model' keys, got {sorted(extra)}")
    return RunConfig(
        model=model, dataset=dataset, train=TrainSettings(**train), params=params,
        seed=2026 if seed is None else seed, variant=variant or "default", data=data or {},
    )
