"""Where data, prepared datasets and runs live. Environment-overridable (CTRSERVE_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class PathSettings(BaseSettings):
    """Filesystem locations used by the offline path."""

    model_config = SettingsConfigDict(env_prefix="CTRSERVE_")

    #: the shared public datasets (never committed to the repository)
    data_dir: Path = REPO_ROOT.parent / "shared" / "data"
    #: prepared datasets, runs, model repositories
    work_dir: Path = REPO_ROOT / "work"

    @property
    def processed_dir(self) -> Path:
        return self.work_dir / "processed"

    @property
    def runs_dir(self) -> Path:
        return self.work_dir / "runs"


def settings() -> PathSettings:
    return PathSettings()
