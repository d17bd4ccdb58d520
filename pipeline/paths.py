"""Where every stage reads and writes: each path is declared here once.

`dvc.yaml` names the same paths as its deps and outs (DVC needs them literally);
`tests/test_dvc_contract.py` checks that the two agree.

Two roots matter. The *workspace* is the directory holding `dvc.yaml` that the stage runs in; for
`dvc exp run --queue/--temp` that is a copy under `.dvc/tmp/exps/`. The *repository* is where the
MLflow store lives: `$DVC_ROOT` when DVC runs the stage (it points at the real repository even for
queued experiments), so every experiment's runs land in one store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
        return self.raw / "asl_alphabet_train" / "asl_alphabet_train"

    @property
    def raw_test(self) -> Path:
        return self.raw / "asl_alphabet_test" / "asl_alphabet_test"

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
