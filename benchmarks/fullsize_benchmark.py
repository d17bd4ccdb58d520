"""The data path at the Kaggle set's size: 87,000 synthetic 200x200 JPEGs (3,000 per class).

    python benchmarks/fullsize_benchmark.py                      # everything: about 1 hour on 2 quiet cores
    python benchmarks/fullsize_benchmark.py --parts preprocess   # or memory, stream, stream-memory
    python benchmarks/fullsize_benchmark.py --before DIR         # also today's code (a checkout of
                                                                 # pipeline/ at an older commit) for (b)

The JPEGs are generated once into --data (default /work/bench-data/asl-87k) and reused. Every
stage runs as the user runs it (`python -m pipeline ...` in a workspace under --data, MLflow in a
store there), while a thread samples the memory of the command's whole process tree every second
as proportional set size (psutil `memory_full_info().pss`: a page shared by n processes counts
1/n in each, so shared pages count once in the sum) and the largest resident set of one process.

  (a) `fetch` (folder source -> data/raw) and `preprocess` at 128 and 64 px: wall time, images/s
      (the stage's own figure, and the whole command), against one core's plain PIL
      decode+resize of 4,000 of the same files (measured before and after the stage, the faster
      taken; every file read once before, so both decode from the page cache); peak PSS of the
      stage, and its processes' CPU time with the kernel's part. Also at 224 px on 20,000 of the
      images (data.max_images), to show the stage's memory does not grow with the size.
  (b) `train ddp` at 64 px with gpus=1 and gpus=2 on the same shards (resnet18, one epoch, global
      batch 64): peak PSS of all processes together, and the time from the command's start to
      the first batch; with --before, the same for today's code (first 120 s of each run: its
      private copies are made before the first step).
  (c) streaming: `train dp` at 64 px on 20,000 of the images (0.49 GB of splits) with
      train.memory_budget_gb 0.2 (and train.shuffle_buffer 2048), against the same training
      memory-mapped: images/s and CPU seconds per image (small_cnn, whose short steps make any
      cost of the data path show most; runs alternating, best of each), and the streamed run's
      peak RSS against the budget plus a process's own overhead (the same training's peak RSS on
      the default 2,900-image set).

Prints one table per part and writes every figure to --out (JSON). A measurement, not a test:
always exits 0. The machine may be shared; the 1-minute load average is printed with each part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IMAGES_PER_CLASS = 3000
TRAIN_DIR = Path("asl_alphabet_train", "asl_alphabet_train")
TARGET_PREPROCESS = 1.8
TARGET_MEMORY = 1.3
TARGET_STREAM = 0.9


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


# --- the data, once ------------------------------------------------------------------------------


def ensure_jpegs(root: Path) -> Path:
    """87,000 200x200 JPEGs (+28 test images) under root/raw, generated once."""
    marker = root / "generated.json"
    if not marker.is_file():
        from pipeline.synthetic import generate_synthetic_dataset

        started = time.perf_counter()
        count = generate_synthetic_dataset(
            root / "raw", images_per_class=IMAGES_PER_CLASS, frames_per_run=10, seed=0, size=200
        )
        marker.write_text(
            json.dumps(
                {
                    "images_per_class": IMAGES_PER_CLASS,
                    "frames_per_run": 10,
                    "seed": 0,
                    "size": 200,
                    "files": count,
                    "seconds": time.perf_counter() - started,
                }
            )
        )
    print(f"data: {root / 'raw'} ({json.loads(marker.read_text())['files']} files)")
    return root / "raw"


# --- running a command and watching its memory -------------------------------------------------------


class Watched:
    """A command run to its end (or `limit` seconds) while its process tree's memory is sampled."""

    def __init__(self, command: list[str], cwd: Path, env: dict, log: Path, limit: float | None = None):
        self.peak_pss = self.peak_rss = 0
        self.cpu_seconds = self.system_seconds = 0.0
        """User + system (and system alone) CPU of the tree's processes as last seen alive, sampled every
        second (a busy machine barely changes it)."""
        self.rank0_started: float | None = None
        self._cpu: dict[int, tuple[float, float]] = {}
        self.started = time.time()
        with open(log, "w") as out:
            process = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            sampler = threading.Thread(target=self._sample, args=(process,), daemon=True)
            sampler.start()
            try:
                self.code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGTERM)  # the group this command started, nothing else
                self.code = process.wait()
            sampler.join()
        self.seconds = time.time() - self.started
        self.output = log.read_text()

    def _sample(self, process: subprocess.Popen) -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            pss = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for member in tree:
                try:
                    info = member.memory_full_info()
                    pss += info.pss
                    times = member.cpu_times()
                    self._cpu[member.pid] = (times.user, times.system)
                    self.peak_rss = max(self.peak_rss, info.rss)
                    if self.rank0_started is None and member.environ().get("RANK") == "0":
                        self.rank0_started = member.create_time()
                except psutil.Error:
                    continue
            self.peak_pss = max(self.peak_pss, pss)
            self.cpu_seconds = sum(user + system for user, system in self._cpu.values())
            self.system_seconds = sum(system for _, system in self._cpu.values())
            time.sleep(1.0)  # smaps of a process mapping gigabytes is not free to read

    def check(self) -> Watched:
        if self.code != 0:
            raise SystemExit(f"command failed ({self.code}):\n{self.output[-3000:]}")
        return self


def stage(workspace: Path, *args: str, code: Path = REPO, limit: float | None = None) -> Watched:
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log = workspace / f"{'-'.join(args)}.log"
    return Watched([sys.executable, "-m", "pipeline", *args], workspace, env, log, limit)


def write_params(workspace: Path, values: dict) -> None:
    (workspace / "mlruns").mkdir(parents=True, exist_ok=True)
    (workspace / "params.yaml").write_text(yaml.safe_dump(values))


def data_params(raw: Path, size: int) -> dict:
    # No external test set: the JPEGs are a folder source, and (a) times the main set alone.
    return {"source": str(raw), "image_size": size, "block_size": 50, "block_gap": 1, "external_test": None}


# --- (a) fetch and preprocess --------------------------------------------------------------------------


def plain_pil_rate(files: list[Path], size: int) -> float:
    for path in files[:100]:  # warm-up
        with Image.open(path) as image:
            np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for path in files:
            with Image.open(path) as image:
                np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        best = max(best, len(files) / (time.perf_counter() - started))
    return best


def part_preprocess(raw: Path, workspace: Path, results: dict) -> None:
    write_params(workspace, {"seed": 0, "data": data_params(raw, 64)})
    fetch = stage(workspace, "fetch").check()
    results["fetch"] = {"seconds": fetch.seconds, "peak_pss_mb": fetch.peak_pss / 2**20, "load": load()}
    print(f"fetch: {fetch.seconds:.1f}s, peak PSS {fetch.peak_pss / 2**20:.0f} MiB ({load()})")
    files = sorted((workspace / "data" / "raw" / TRAIN_DIR).glob("*/*.jpg"))
    sample = random.Random(0).sample(files, 4000)
    for size, cap in ((224, 20_000), (128, None), (64, None)):  # 64 last: its shards stay for (b) and (c)
        write_params(workspace, {"seed": 0, "data": {**data_params(raw, size), "max_images": cap}})
        # Every JPEG read once first: the stage, like the baseline, then decodes from the page cache
        # (a run after another size's 8 GB of shards otherwise reads part of them from the disk).
        for path in files:
            path.read_bytes()
        # This machine's speed drifts by a third over minutes: the baseline is measured just before
        # and just after the stage, and the faster of the two is the one compared against.
        pil_before = plain_pil_rate(sample, size)
        run = stage(workspace, "preprocess").check()
        pil = max(pil_before, plain_pil_rate(sample, size))
        summary = re.search(r"images at \d+px .* ([\d.]+)s \((\d+) images/s\)", run.output)
        assert summary is not None, run.output[-2000:]
        stage_seconds, rate = map(float, summary.groups())
        images = round(stage_seconds * rate)
        shards = list((workspace / "data" / "shards").glob("*.safetensors"))
        row: dict[str, Any] = {
            "images": images, "stage_seconds": stage_seconds, "command_seconds": run.seconds,
            "images_per_second": rate, "command_images_per_second": images / run.seconds,
            "plain_pil_one_core": pil, "plain_pil_before": pil_before,
            "ratio": rate / pil, "command_ratio": images / run.seconds / pil,
            "peak_pss_mb": run.peak_pss / 2**20, "peak_rss_mb": run.peak_rss / 2**20, "shards": len(shards),
            "shard_mb": max(p.stat().st_size for p in shards) / 2**20, "load": load(),
            "cpu_seconds": run.cpu_seconds, "system_seconds": run.system_seconds,
        }  # fmt: skip
        results[f"preprocess_{size}" + (f"_max{cap}" if cap else "")] = row
        verdict = "PASS" if row["ratio"] >= TARGET_PREPROCESS else "FAIL"
        print(
            f"preprocess {size}px: {images} images in {stage_seconds:.1f}s ({rate:.0f}/s; "
            f"command {run.seconds:.1f}s), plain PIL 1 core "
            f"{pil:.0f}/s -> {row['ratio']:.2f}x ({verdict}, target {TARGET_PREPROCESS}x), "
            f"peak PSS {row['peak_pss_mb']:.0f} MiB, "
            f"{len(shards)} shards of <= {row['shard_mb']:.0f} MiB, CPU {run.cpu_seconds:.0f}s of which "
            f"kernel {run.system_seconds:.0f}s ({load()})"
        )


# --- (b) memory of train ddp ----------------------------------------------------------------------------


def _startup(run: Watched) -> float | None:
    """Seconds from the command's start to rank 0's first batch (its printed delay after its own start)."""
    found = re.search(r"first batch ([\d.]+)s after the process started", run.output)
    if not found or run.rank0_started is None:
        return None
    return run.rank0_started + float(found.group(1)) - run.started


def part_memory(raw: Path, workspace: Path, results: dict, before: Path | None) -> None:
    train = {"epochs": 1, "batch_size": 64}
    runs = {}
    for gpus in (1, 2):
        write_params(workspace, {"seed": 0, "gpus": gpus, "data": data_params(raw, 64), "train": train})
        run = stage(workspace, "train", "ddp").check()
        figures = json.loads((workspace / "metrics" / "train_ddp.json").read_text())
        runs[gpus] = run
        results[f"train_ddp_{gpus}"] = {
            "peak_pss_mb": run.peak_pss / 2**20, "seconds": run.seconds, "first_batch_seconds": _startup(run),
            "images_per_second": figures["images_per_second"], "load": load(),
        }  # fmt: skip
        print(
            f"train ddp gpus={gpus}: peak PSS {run.peak_pss / 2**20:.0f} MiB, "
            f"first batch after {_startup(run)}s, {run.seconds:.0f}s in all ({load()})"
        )
    ratio = runs[2].peak_pss / runs[1].peak_pss
    results["memory_ratio"] = ratio
    print(
        f"train ddp PSS gpus=2 / gpus=1: {ratio:.2f}x ({'PASS' if ratio <= TARGET_MEMORY else 'FAIL'}, "
        f"target <= {TARGET_MEMORY}x)"
    )
    if before is None:
        return
    old = {}
    for gpus in (1, 2):
        # Today's params: no keys it does not know.
        write_params(
            workspace,
            {"seed": 0, "gpus": gpus, "data": {**data_params(raw, 64), "shard_size": 2048}, "train": train},
        )
        old[gpus] = stage(workspace, "train", "ddp", code=before, limit=120)
        results[f"before_train_ddp_{gpus}"] = {"peak_pss_mb": old[gpus].peak_pss / 2**20, "load": load()}
        print(
            f"before: train ddp gpus={gpus}: peak PSS {old[gpus].peak_pss / 2**20:.0f} MiB "
            f"in its first 120 s ({load()})"
        )
    results["before_memory_ratio"] = old[2].peak_pss / old[1].peak_pss
    print(f"before: PSS gpus=2 / gpus=1: {results['before_memory_ratio']:.2f}x")


# --- (c) streaming --------------------------------------------------------------------------------------


STREAM_IMAGES = 20_000  # data.max_images of (c): a run of each kind takes minutes, not an hour
STREAM_BUFFER = 2048


def part_stream(raw: Path, workspace: Path, results: dict, rounds: int, budget_gb: float) -> None:
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    data = {**data_params(raw, 64), "max_images": STREAM_IMAGES}
    if not (workspace / "data" / "shards" / "manifest.json").is_file():
        write_params(workspace, {"seed": 0, "data": data})
        stage(workspace, "fetch").check()
        stage(workspace, "preprocess").check()
    manifest = json.loads((workspace / "data" / "shards" / "manifest.json").read_text())
    split_gb = sum(manifest["splits"][s]["count"] for s in ("train", "val")) * 3 * 64 * 64 * 2 / 1e9
    rates: dict[str, list[float]] = {"mapped": [], "streamed": []}
    peaks: dict[str, list[int]] = {"mapped": [], "streamed": []}
    cpu_per_image: dict[str, list[float]] = {"mapped": [], "streamed": []}
    for round_ in range(rounds):
        modes = [("mapped", None), ("streamed", budget_gb)]
        for mode, budget in modes if round_ % 2 == 0 else modes[::-1]:
            train = {
                "epochs": 1,
                "batch_size": 64,
                "memory_budget_gb": budget,
                "shuffle_buffer": STREAM_BUFFER,
            }
            values = {"seed": 0, "gpus": 1, "data": data, "model": {"name": "small_cnn"}, "train": train}
            write_params(workspace, values)
            run = stage(workspace, "train", "dp").check()
            assert f"({mode} data)" in run.output, run.output[-2000:]
            figures = json.loads((workspace / "metrics" / "train_dp.json").read_text())
            rates[mode].append(figures["images_per_second"])
            # Whole-run CPU per trained image: what the data path costs, whatever the neighbours do.
            cpu_per_image[mode].append(
                run.cpu_seconds / (figures["images_per_second"] * figures["train_seconds"])
            )
            peaks[mode].append(run.peak_rss)
            print(
                f"train dp small_cnn {mode}: {figures['images_per_second']:.0f} images/s, "
                f"{cpu_per_image[mode][-1] * 1e3:.2f} CPU ms/image, "
                f"data wait {figures['data_wait_fraction']:.1%}, "
                f"peak RSS {run.peak_rss / 2**20:.0f} MiB ({load()})"
            )
    ratio = max(rates["streamed"]) / max(rates["mapped"])
    cpu_ratio = min(cpu_per_image["mapped"]) / min(cpu_per_image["streamed"])
    overhead = process_overhead(workspace.parent / "workspace-small")
    peak = max(peaks["streamed"])
    results["stream"] = {
        "split_gb": split_gb, "budget_gb": budget_gb, "rates": rates, "cpu_per_image": cpu_per_image,
        "peak_rss_mb": {k: [p / 2**20 for p in v] for k, v in peaks.items()},
        "ratio": ratio, "cpu_ratio": cpu_ratio,
        "overhead_mb": overhead / 2**20, "peak_minus_overhead_mb": (peak - overhead) / 2**20,
    }  # fmt: skip
    verdict = "PASS" if ratio >= TARGET_STREAM else "FAIL"
    print(
        f"streamed / memory-mapped images/s (best of {rounds} each): {ratio:.2f} ({verdict}, "
        f"target >= {TARGET_STREAM})"
    )
    print(f"memory-mapped / streamed CPU seconds per image (best of {rounds} each): {cpu_ratio:.2f}")
    # The stated fixed overhead is the process's own (runtime, model, batches): shards are read, not mapped.
    within = "PASS" if peak - overhead <= budget_gb * 1e9 else "FAIL"
    print(
        f"splits {split_gb:.2f} GB, budget {budget_gb} GB; streamed peak RSS {peak / 2**20:.0f} MiB = "
        f"{overhead / 2**20:.0f} MiB of process overhead + {(peak - overhead) / 2**20:.0f} MiB ({within}: "
        f"under the budget, {budget_gb * 1e9 / 2**20:.0f} MiB)"
    )


def _status_mib(pid: int) -> dict[str, int]:
    """RssAnon (the process's own memory) and RssFile (pages of mapped files: libraries, shards), MiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in lines if line.startswith("Rss")}


def part_stream_memory(workspace: Path, results: dict, budget_gb: float) -> None:
    """(c) again, one run each, sampling the process's anonymous and file-backed memory every 0.2 s:
    the slots show as anonymous memory, the shards' pages as file-backed. The memory-mapped run
    touches every page of both splits, so its file-backed peak less their size is the libraries'."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}"
    values = yaml.safe_load((workspace / "params.yaml").read_text())
    peaks = {}
    for mode, budget in (("mapped", None), ("streamed", budget_gb)):
        values["train"]["memory_budget_gb"] = budget
        write_params(workspace, values)
        command = [sys.executable, "-m", "pipeline", "train", "dp"]
        process = subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.DEVNULL)
        peak = {"RssAnon": 0, "RssFile": 0}
        while process.poll() is None:
            try:
                now = _status_mib(process.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            peak = {key: max(value, now.get(key, 0)) for key, value in peak.items()}  # none once a zombie
            time.sleep(0.2)
        peaks[mode] = peak
        print(f"train dp {mode}: peak anonymous {peak['RssAnon']} MiB, file-backed {peak['RssFile']} MiB")
    manifest = json.loads((workspace / "data" / "shards" / "manifest.json").read_text())
    split_mib = sum(manifest["splits"][s]["count"] for s in ("train", "val")) * 3 * 64 * 64 * 2 // 2**20
    libraries = peaks["mapped"]["RssFile"] - split_mib
    slots = peaks["streamed"]["RssAnon"] - peaks["mapped"]["RssAnon"]
    pages = peaks["streamed"]["RssFile"] - libraries
    results["stream_memory"] = {"peaks": peaks, "libraries_mib": libraries, "slots_mib": slots}
    results["stream_memory"]["shard_pages_mib"] = pages
    budget_mib = budget_gb * 1e9 / 2**20
    within = "PASS" if slots + pages <= budget_mib else "FAIL"
    print(
        f"streamed data held: {slots} MiB more anonymous memory than memory-mapped (the slots) + {pages} "
        f"MiB of shard pages = {slots + pages} MiB ({within}: budget {budget_mib:.0f} MiB)"
    )


def process_overhead(workspace: Path) -> int:
    """Peak RSS of the same training on the default synthetic set (2,900 images, 71 MB of shards at
    64 px, memory-mapped): the runtime, model and batches, i.e. what a process takes besides data."""
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    write_params(
        workspace,
        {"seed": 0, "gpus": 1, "model": {"name": "small_cnn"}, "train": {"epochs": 1, "batch_size": 64}},
    )
    if not (workspace / "data" / "shards" / "manifest.json").is_file():
        stage(workspace, "fetch").check()
        stage(workspace, "preprocess").check()
    run = stage(workspace, "train", "dp").check()
    print(
        "process overhead: train dp small_cnn on the default 2,900-image set: "
        f"peak RSS {run.peak_rss / 2**20:.0f} MiB ({load()})"
    )
    return run.peak_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/bench-data/asl-87k"))
    parser.add_argument("--parts", default="preprocess,memory,stream")
    parser.add_argument("--before", type=Path, help="a folder holding an older pipeline/ package, for (b)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="(c): runs of each, streamed and memory-mapped alternating"
    )
    parser.add_argument(
        "--budget-gb", type=float, default=0.2, help="(c): train.memory_budget_gb of the streamed runs"
    )
    parser.add_argument("--out", type=Path, default=Path("/work/bench-data/fullsize_benchmark.json"))
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; {load()}"
    )
    raw = ensure_jpegs(args.data)
    workspace = args.data / "workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    results: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    parts = args.parts.split(",")
    if "preprocess" in parts:
        part_preprocess(raw, workspace, results)
        args.out.write_text(json.dumps(results, indent=2))
    if "memory" in parts:
        part_memory(raw, workspace, results, args.before)
        args.out.write_text(json.dumps(results, indent=2))
    if "stream" in parts:
        part_stream(raw, args.data / "workspace-stream", results, args.rounds, args.budget_gb)
        args.out.write_text(json.dumps(results, indent=2))
    if "stream-memory" in parts:
        part_stream_memory(args.data / "workspace-stream", results, args.budget_gb)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
