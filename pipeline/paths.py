"""Where every stage reads and writes, each path declared once (`dvc.yaml` repeats them literally;
`tests/test_dvc_contract.py` keeps the two in step).

The *workspace* holds `dvc.yaml` (for queued experiments, a copy under `.dvc/tmp/exps/`); the
*repository* holds the MLflow store: `$DVC_ROOT` under DVC, so every experiment logs to one store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.dataset import kaggle_test_dir, kaggle_train_dir


def find_workspace(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) that holds `dvc.yaml`, else `start`."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return start


def repository_root() -> Path:
    """Root of the real repository, whose `mlruns/` holds the MLflow store."""
    dvc_root = os.environ.get("DVC_ROOT")
    return Path(dvc_root).resolve() if dvc_root else find_workspace()


@dataclass(frozen=True)
class Paths:
    """The pipeline's files, relative to one workspace."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def raw_train(self) -> Path:
        return kaggle_train_dir(self.raw)

    @property
    def raw_test(self) -> Path:
        return kaggle_test_dir(self.raw)

    @property
    def raw_external(self) -> Path:
        """The external test set (`data.external_test`): `<class>/<image>`, other signers than data/raw's."""
        return self.root / "data" / "external"

    @property
    def shards(self) -> Path:
        return self.root / "data" / "shards"

    @property
    def manifest(self) -> Path:
        return self.shards / "manifest.json"

    def model_dir(self, strategy: str) -> Path:
        return self.root / "models" / strategy

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def train_metrics(self, strategy: str) -> Path:
        return self.metrics / f"train_{strategy}.json"

    def train_curve(self, strategy: str) -> Path:
        return self.metrics / f"curves_{strategy}.csv"

    def eval_metrics(self, strategy: str) -> Path:
        return self.metrics / f"eval_{strategy}.json"

    def eval_predictions(self, strategy: str) -> Path:
        return self.metrics / f"predictions_{strategy}.csv"

    def eval_confusion_png(self, strategy: str) -> Path:
        return self.metrics / f"confusion_{strategy}.png"

    def external_predictions(self, strategy: str) -> Path:
        return self.metrics / f"predictions_external_{strategy}.csv"

    def external_confusion_png(self, strategy: str) -> Path:
        return self.metrics / f"confusion_external_{strategy}.png"

    @property
    def promotion(self) -> Path:
        return self.metrics / "promotion.json"

    @property
    def promote_metrics(self) -> Path:
        return self.metrics / "promote.json"

    @property
    def scaling(self) -> Path:
        return self.root / "reports" / "scaling"


def workspace_paths() -> Paths:
    return Paths(find_workspace())
