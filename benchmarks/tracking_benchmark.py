"""What does a team's tracking server cost? `dvc repro` against the sqlite store and against
`mlflow server` on PostgreSQL (proxied artifacts), in one run.

    python benchmarks/tracking_benchmark.py                  # default params, sqlite then server
    python benchmarks/tracking_benchmark.py --repeat 2       # sqlite, server, server, sqlite
    python benchmarks/tracking_benchmark.py --profile tiny   # the tests' tiny profile (seconds per stage)

Each measurement is a `dvc repro` of the whole pipeline in a fresh copy of the project (committed
files only, like `tests/test_dvc_pipeline.py`; a fresh sqlite store each time), so every stage
runs. The server is started once, before the first measurement (`pipeline.team_server`, what
`python -m pipeline team-server` runs), on a free loopback port, and one tiny-profile `dvc repro`
against each store warms both up unreported. In every stage process a `sitecustomize` hook times the
calls into MLflow's stores and artifact repositories (tracking, registry, artifact upload) made on the
main thread: that is the stage's logging time. Model saving and pickling, which do not depend on the
store, are not in it, nor is the system-metrics sampler, which runs on its own thread. Prints one
table per measurement and the overhead of the server; figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# Loaded at start-up by every Python process of a stage (PYTHONPATH puts it first).
HOOK = r"""
import atexit, importlib.abc, importlib.machinery, inspect, json, os, sys, threading, time

_started = time.perf_counter()
_spent, _calls, _inside = [0.0], [0], threading.local()
_TARGETS = {
    "mlflow.store.tracking.rest_store": "RestStore",
    "mlflow.store.tracking.sqlalchemy_store": "SqlAlchemyStore",
    "mlflow.store.model_registry.rest_store": "RestStore",
    "mlflow.store.model_registry.sqlalchemy_store": "SqlAlchemyStore",
    "mlflow.store.artifact.local_artifact_repo": "LocalArtifactRepository",
    "mlflow.store.artifact.http_artifact_repo": "HttpArtifactRepository",
}


def _timed(function):
    def timed(*args, **kwargs):
        # Outermost calls on the main thread only: a store method calling another counts once.
        if threading.current_thread() is not threading.main_thread() or getattr(_inside, "yes", False):
            return function(*args, **kwargs)
        _inside.yes, begin = True, time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _spent[0] += time.perf_counter() - begin
            _calls[0] += 1
            _inside.yes = False
    return timed


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            cls = getattr(module, _TARGETS[name])
            for attribute, value in list(vars(cls).items()):
                # __init__ too: a sqlite store checks (on a fresh file, creates) its schema there.
                if inspect.isfunction(value) and (attribute == "__init__" or not attribute.startswith("_")):
                    setattr(cls, attribute, _timed(value))

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())


@atexit.register
def _report():
    line = {
        "argv": sys.argv, "pid": os.getpid(), "wall": time.perf_counter() - _started,
        "mlflow": _spent[0], "calls": _calls[0],
    }
    with open(os.environ["TRACKING_TIMINGS"], "a") as out:
        out.write(json.dumps(line) + "\n")
"""


def stage_of(argv: list[str]) -> str | None:
    """`train dp` for `python -m pipeline train dp ...` (argv[0] is the package's __main__.py)."""
    if not argv or not argv[0].endswith(os.path.join("pipeline", "__main__.py")):
        return None
    words = [a for a in argv[1:3] if not a.startswith("-")]
    return " ".join(words) if words else None


def project_copy(target: Path, profile: str) -> Path:
    from test_dvc_pipeline import make_project_copy

    from pipeline.config import load_params, to_yaml_dict

    from conftest import TINY_PARAMS

    params = TINY_PARAMS if profile == "tiny" else to_yaml_dict(load_params(REPO / "params.yaml"))
    return make_project_copy(target, params)


def measure(project: Path, hook_dir: Path, tracking_uri: str | None) -> dict:
    timings = project / "tracking-timings.jsonl"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY", "DVC_"))
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=f"{hook_dir}{os.pathsep}{REPO}",
        TRACKING_TIMINGS=str(timings),
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    # A clone's sqlite store outlives one `dvc repro`, as the server's database does: create its
    # schema (seconds, once per store) before the measurement, and report that on its own.
    schema = 0.0
    if tracking_uri is None:
        create = (
            "import time; t = time.perf_counter(); from pipeline.tracking import configure; "
            "configure('asl-alphabet'); print(time.perf_counter() - t)"
        )
        schema = float(
            subprocess.run(
                [sys.executable, "-c", create],
                cwd=project,
                env={**env, "PYTHONPATH": str(REPO)},
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[-1]
        )
    begin = time.perf_counter()
    result = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    total = time.perf_counter() - begin
    if result.returncode != 0:
        raise SystemExit(f"dvc repro failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    stages: dict[str, dict] = defaultdict(lambda: {"wall": 0.0, "mlflow": 0.0, "calls": 0})
    for line in timings.read_text().splitlines():
        record = json.loads(line)
        stage = stage_of(record["argv"])
        if stage is None:
            continue
        entry = stages[stage]
        entry["wall"] = max(entry["wall"], record["wall"])  # the launcher of ddp outlives its ranks
        entry["mlflow"] += record["mlflow"]
        entry["calls"] += record["calls"]
    return {"total": total, "stages": dict(stages), "schema": schema}


def report(label: str, figures: dict) -> None:
    created = (
        f" (the fresh store's schema took {figures['schema']:.1f} s before it)" if figures["schema"] else ""
    )
    print(f"\n{label}: dvc repro {figures['total']:.1f} s{created}")
    print(f"  {'stage':<14} {'stage s':>8} {'logging s':>10} {'calls':>6}")
    for stage, entry in sorted(figures["stages"].items()):
        print(f"  {stage:<14} {entry['wall']:>8.1f} {entry['mlflow']:>10.2f} {entry['calls']:>6}")
    logging = sum(e["mlflow"] for e in figures["stages"].values())
    runs = len(figures["stages"])
    print(
        f"  logging in all {runs} stage runs: {logging:.2f} s ({logging / runs:.2f} s per run, "
        f"{100 * logging / figures['total']:.1f}% of the repro)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile",
        choices=("default", "tiny"),
        default="default",
        help="params.yaml as shipped, or the tests' tiny profile",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="pairs of measurements; the order alternates (sqlite, server, server, sqlite, ...)",
    )
    args = parser.parse_args()

    from pipeline.team_server import team_server

    from serving_support import free_port

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"{cpu}, {os.cpu_count()} cores; profile {args.profile}; load average before: "
        f"{os.getloadavg()[0]:.2f}"
    )
    work = Path(tempfile.mkdtemp(prefix="asl-tracking-benchmark-"))
    work.chmod(0o711)  # PostgreSQL may run as another user
    hook_dir = work / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    results: dict[str, list[dict]] = {"sqlite": [], "server": []}
    try:
        with team_server(work / "server", port=free_port()) as server:
            # Not reported: neither store's first measurement should pay for a cold start (modules
            # read from disk, the server's first requests).
            for n, uri in enumerate((None, server.url)):
                measure(project_copy(work / f"warm-up-{n}", "tiny"), hook_dir, uri)
            order = []
            for pair in range(args.repeat):
                order += ["sqlite", "server"] if pair % 2 == 0 else ["server", "sqlite"]
            for n, backend in enumerate(order):
                project = project_copy(work / f"project-{n}", args.profile)
                figures = measure(project, hook_dir, server.url if backend == "server" else None)
                results[backend].append(figures)
                store = (
                    "sqlite:///.../mlruns/mlflow.db" if backend == "sqlite" else server.url + ", PostgreSQL"
                )
                report(f"{backend} ({store})", figures)
                shutil.rmtree(project, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mean(backend: str, key) -> float:
        return sum(key(f) for f in results[backend]) / len(results[backend])

    total = {b: mean(b, lambda f: f["total"]) for b in results}
    logging = {b: mean(b, lambda f: sum(e["mlflow"] for e in f["stages"].values())) for b in results}
    runs = len(results["sqlite"][0]["stages"])
    print(
        f"\nmean of {args.repeat}: dvc repro sqlite {total['sqlite']:.1f} s, server {total['server']:.1f} s "
        f"({total['server'] - total['sqlite']:+.1f} s, "
        f"{100 * (total['server'] / total['sqlite'] - 1):+.1f}%)"
    )
    print(
        f"logging per stage run: sqlite {logging['sqlite'] / runs:.2f} s, "
        f"server {logging['server'] / runs:.2f} s ({(logging['server'] - logging['sqlite']) / runs:+.2f} s); "
        f"load average after: {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
