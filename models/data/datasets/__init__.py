"""Raw dataset loaders, registered by name. A loader returns the three raw splits.

Contract (checked by ``prepare``): ``{"train"|"valid"|"test": {column: np.ndarray}}`` with one
column per spec feature, the label (0/1) and the spec's user-id column. Sparse columns hold raw
values (missing: ``""`` or ``-1``); dense columns floats (missing: NaN); a sequence field is an
``[N, max_len]`` array of raw ids, most recent event first, padded with ``-1``.
An optional extra entry ``VOCAB_KEY`` holds, per sparse feature, the raw ids its vocabulary is
fitted on instead of the train split's (Taobao: the warm-up window's ids).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RawSplits = dict[str, dict[str, np.ndarray]]
VOCAB_KEY = "vocabulary"
Loader = Callable[..., RawSplits]

LOADERS: dict[str, Loader] = {}


def register_loader(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn

    return wrap


def get_loader(name: str) -> Loader:
    _import_all()
    if name not in LOADERS:
        raise KeyError(f"unknown dataset loader {name!r}; known: {sorted(LOADERS)}")
    return LOADERS[name]


def read_split_files(
    root: Path, files: dict[str, str], read: Callable[[Path, int], dict[str, np.ndarray]], what: str, max_rows: int = 0
) -> RawSplits:
    """One file per split read by ``read(path, max_rows)``; a missing file or a parse error names the file."""
    out: RawSplits = {}
    for split, name in files.items():
        f = Path(root) / name
        if not f.exists():
            raise FileNotFoundError(f"{what} not found: {f} (set CTRSERVE_DATA_DIR)")
        try:
            out[split] = read(f, int(max_rows))
        except ValueError as exc:
            raise ValueError(f"{f}: {exc}") from None
    return out


def load_raw(loader: str, data_dir: Path, spec: Any, **source: Any) -> RawSplits:
    return get_loader(loader)(data_dir=data_dir, spec=spec, **source)


def _import_all() -> None:
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
