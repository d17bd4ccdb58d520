"""Stage `fetch`: write data/raw/ in the Kaggle layout from `data.source`, and data/external/
(class folders of other signers' images) from `data.external_test`.

    python -m pipeline fetch       # synthetic (offline), kaggle (kagglehub), or a .zip/folder path
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pipeline.config import Params, to_flat_dict
from pipeline.paths import Paths

if TYPE_CHECKING:
    from pipeline.sources import IngestReport

IGNORED_ARTIFACT = "ignored_files.json"
"""The fetch run's artifact naming the files the source held that are not data set images."""
IGNORED_PRINTED = 5
"""How many ignored names the stage prints; the artifact has the rest."""
EXTERNAL_SOURCE_FILE = "source.json"
"""Written into data/external/ (never an image): where its images came from, or that there are none."""


def fetch_raw(params: Params, paths: Paths) -> IngestReport:
    """Produce data/raw/ from the configured source; returns what was written and what was ignored."""
    from pipeline.fileio import remove_leftovers, swap_in
    from pipeline.sources import IngestReport, ingest_source
    from pipeline.synthetic import generate_synthetic_dataset

    source = params.data.source
    if source != "synthetic":
        return ingest_source(source, paths.raw, base_dir=paths.root)
    # Staged and swapped in like an ingested source: an interrupted generation leaves the
    # previous data/raw/ (or none), never a partial one.
    remove_leftovers(paths.raw)
    staging = paths.raw.with_name(paths.raw.name + ".tmp-synthetic")
    synthetic = params.data.synthetic
    written = generate_synthetic_dataset(
        staging,
        images_per_class=synthetic.images_per_class,
        frames_per_run=synthetic.frames_per_run,
        seed=params.seed,
        workers=params.data.workers,
    )
    swap_in(staging, paths.raw)
    test_files = sum(1 for _ in paths.raw_test.iterdir())
    return IngestReport(written - test_files, test_files, ignored=(), ignored_count=0, source="synthetic")


def fetch_external(params: Params, paths: Paths) -> IngestReport | None:
    """Produce data/external/ from `data.external_test`; None when it is null (the folder then
    holds only source.json: DVC's output exists, and preprocess finds no external images)."""
    from pipeline.fileio import atomic_write_json, remove_leftovers, swap_in
    from pipeline.sources import IngestReport, ingest_external
    from pipeline.synthetic import generate_external_set

    external, target = params.data.external_test, paths.raw_external
    report = None
    if external is not None and external.strip() != "synthetic":
        report = ingest_external(external, target, base_dir=paths.root)
    else:
        remove_leftovers(target)
        staging = target.with_name(target.name + ".tmp-external")
        staging.mkdir(parents=True, exist_ok=True)
        if external is not None:
            per_class = params.data.synthetic.external_images_per_class
            written = generate_external_set(
                staging, images_per_class=per_class, seed=params.seed, workers=params.data.workers
            )
            report = IngestReport(0, written, ignored=(), ignored_count=0, source="synthetic")
        swap_in(staging, target)
    atomic_write_json(target / EXTERNAL_SOURCE_FILE, {"external_test": report.source if report else None})
    return report


def run_fetch(params: Params, paths: Paths) -> dict[str, int]:
    import mlflow

    from pipeline.tracking import tracked_run

    data_params = {"seed": params.seed, **to_flat_dict(params.data, "data.")}
    with tracked_run(params.mlflow.experiment, "fetch", params=data_params):
        started = time.perf_counter()
        report = fetch_raw(params, paths)
        external = fetch_external(params, paths)
        seconds = time.perf_counter() - started
        counts = {
            "train_files": report.train_files,
            "test_files": report.test_files,
            "ignored_files": report.ignored_count,
            "external_files": external.test_files if external else 0,
        }
        images = report.train_files + report.test_files + counts["external_files"]
        speed = images / seconds if seconds else 0.0
        mlflow.log_metrics({**counts, "fetch_seconds": seconds, "images_per_second": speed})
        # Logged even when empty, so that every fetch run answers "what did the source hold besides images?"
        mlflow.log_dict({"ignored": list(report.ignored), "count": report.ignored_count}, IGNORED_ARTIFACT)
        if external is not None:
            ignored = {"ignored": list(external.ignored), "count": external.ignored_count}
            mlflow.log_dict(ignored, "external_" + IGNORED_ARTIFACT)
    print(
        f"fetch: {report.train_files} training and {report.test_files} test images from {params.data.source}"
        + (f", {external.test_files} external test images from {external.source}" if external else "")
        + ("" if external else ", no external test set")
        + f" in {seconds:.1f}s"
    )
    if report.ignored_count:
        shown = ", ".join(report.ignored[:IGNORED_PRINTED])
        more = ", ..." if report.ignored_count > IGNORED_PRINTED else ""
        print(
            f"fetch: ignored {report.ignored_count} files or folders that are not data set images:"
            f" {shown}{more} (listed in the MLflow run's {IGNORED_ARTIFACT})"
        )
    return counts
