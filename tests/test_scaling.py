"""`python -m pipeline scaling` on the tiny profile: real trainings, one parent run, figure and CSV."""

from __future__ import annotations

import csv

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_params
from pipeline.paths import Paths
from pipeline.scaling import add_efficiency, run_scaling

from conftest import write_params


def test_efficiency_is_speedup_per_added_gpu():
    rows = add_efficiency(
        [
            {"strategy": "ddp", "gpus": 1, "train_seconds": 100.0},
            {"strategy": "ddp", "gpus": 4, "train_seconds": 40.0},
            {"strategy": "dp", "gpus": 2, "train_seconds": 60.0},
            {"strategy": "dp", "gpus": 4, "train_seconds": 60.0},
        ]
    )
    by_key = {(r["strategy"], r["gpus"]): r for r in rows}
    assert by_key["ddp", 4]["speedup"] == pytest.approx(2.5) and by_key["ddp", 4][
        "efficiency"
    ] == pytest.approx(0.625)
    assert by_key["dp", 4]["speedup"] == pytest.approx(1.0) and by_key["dp", 4][
        "efficiency"
    ] == pytest.approx(0.5)
    assert by_key["ddp", 1]["efficiency"] == pytest.approx(1.0)


@pytest.mark.slow
def test_scaling_study_trains_every_configuration_under_one_parent_run(tiny_workspace):
    write_params(
        tiny_workspace, {"scaling": {"gpu_counts": [1, 2], "max_images": 200, "image_size": 32, "epochs": 1}}
    )
    rows = run_scaling(load_params(tiny_workspace / "params.yaml"), Paths(tiny_workspace))

    assert sorted((r["strategy"], r["gpus"]) for r in rows) == [("ddp", 1), ("ddp", 2), ("dp", 1), ("dp", 2)]
    assert {r["world_size"] for r in rows if r["strategy"] == "ddp"} == {1, 2}
    report = Paths(tiny_workspace).scaling
    with open(report / "scaling.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and all(float(row["train_seconds"]) > 0 for row in table)
    assert (report / "scaling.png").stat().st_size > 10_000
    assert not Paths(tiny_workspace).model_dir("dp").exists(), (
        "the study must not touch the pipeline's own models"
    )

    [parent] = mlflow.search_runs(
        experiment_names=["asl-alphabet"], filter_string="tags.stage = 'scaling'", output_format="list"
    )
    children = mlflow.search_runs(
        experiment_names=["asl-alphabet"],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list",
    )
    assert sorted(c.info.run_id for c in children) == sorted(r["run_id"] for r in rows)
    assert all(c.data.params["data.max_images"] == "200" for c in children)
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"scaling.csv", "scaling.png"} <= artifacts
    assert parent.data.metrics["ddp_2gpu_efficiency"] == pytest.approx(
        next(r["efficiency"] for r in rows if (r["strategy"], r["gpus"]) == ("ddp", 2))
    )
