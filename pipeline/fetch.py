"""Stage `fetch`: write data/raw/ in the Kaggle layout from `data.source`.

    python -m pipeline fetch               # or: dvc repro fetch

`synthetic` (the default) draws the data set here, offline; `kaggle` downloads
`grassknoted/asl-alphabet` with kagglehub; a path ingests a `.zip` or folder in the Kaggle layout.
"""

from __future__ import annotations

import time

from pipeline.config import Params, to_flat_dict
from pipeline.paths import Paths


def fetch_raw(params: Params, paths: Paths) -> dict[str, int]:
    """Produce data/raw/ from the configured source; returns file counts."""
    from pipeline.sources import ingest_source, remove_leftovers, swap_in
    from pipeline.synthetic import generate_synthetic_dataset

    source = params.data.source
    if source == "synthetic":
        # Staged and swapped in like an ingested source: an interrupted generation leaves the
        # previous data/raw/ (or none), never a partial one.
        remove_leftovers(paths.raw)
        staging = paths.raw.with_name(paths.raw.name + ".tmp-synthetic")
        synthetic = params.data.synthetic
        written = generate_synthetic_dataset(
            staging, images_per_class=synthetic.images_per_class, frames_per_run=synthetic.frames_per_run, seed=params.seed, workers=params.data.workers
        )
        swap_in(staging, paths.raw)
        test_files = sum(1 for _ in paths.raw_test.iterdir())
        return {"train_files": written - test_files, "test_files": test_files, "ignored_files": 0}
    report = ingest_source(source, paths.raw, base_dir=paths.root)
    return {"train_files": report.train_files, "test_files": report.test_files, "ignored_files": len(report.ignored)}


def run_fetch(params: Params, paths: Paths) -> dict[str, int]:
    import mlflow

    from pipeline.tracking import tracked_run

    data_params = {"seed": params.seed, **to_flat_dict(params.data, "data.")}
    with tracked_run(params.mlflow.experiment, "fetch", params=data_params):
        started = time.perf_counter()
        counts = fetch_raw(params, paths)
        seconds = time.perf_counter() - started
        images = counts["train_files"] + counts["test_files"]
        mlflow.log_metrics({**counts, "fetch_seconds": seconds, "images_per_second": images / seconds if seconds else 0.0})
    print(f"fetch: {counts['train_files']} training and {counts['test_files']} test images from {params.data.source} in {seconds:.1f}s")
    return counts
