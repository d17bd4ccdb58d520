"""How much load does the web page's API take? N concurrent clients against `POST /api/predict`.

    python benchmarks/load_check.py                                  # starts `serve-ui` on the champion
    python benchmarks/load_check.py --model runs:/<run_id>/model     # ... or on any model
    python benchmarks/load_check.py --url http://127.0.0.1:8000      # a server that is already running

Each client is a thread with its own keep-alive connection that uploads the same image (multipart
field `file`, as the page does) again and again until `--seconds` have passed or `--max-requests`
have been sent in all. After a short warm-up it reports requests per second, latency percentiles
(p50, p90, p99, max) and the errors by status. Started by this script, the server runs from the
repository (its MLflow store) with params.yaml's settings and a free loopback port; it is stopped
at the end. The image is the Kaggle-layout test file `A_test.jpg` when data/raw holds one (200x200
JPEG, the data set's size), else a generated 200x200 JPEG.

Client and server share the machine's cores: on a 2-core machine the figures are the whole
machine's, not the server's alone (`benchmarks/serve_benchmark.py` compares servers and commits,
and counts the server's CPU time). Always exits 0 unless the server cannot start (a measurement,
not a test).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TEST_IMAGE = REPO / "data" / "raw" / "asl_alphabet_test" / "asl_alphabet_test" / "A_test.jpg"
WARMUP_REQUESTS = 5


@dataclass
class Tally:
    """What every client thread records; `lock` guards it."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, limit: int) -> bool:
        with self.lock:
            if self.sent >= limit:
                return False
            self.sent += 1
            return True

    def record(self, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.latencies.append(seconds)
            else:
                self.errors[error] = self.errors.get(error, 0) + 1


def default_image() -> tuple[str, bytes]:
    if TEST_IMAGE.is_file():
        return str(TEST_IMAGE.relative_to(REPO)), TEST_IMAGE.read_bytes()
    gradient = np.linspace(0, 255, 200 * 200 * 3).reshape(200, 200, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="JPEG", quality=90)
    return "generated 200x200 JPEG", buffer.getvalue()


# --- the server ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(params_file: Path, model: str | None, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`python -m pipeline serve-ui` on a free port; returns it once /api/health answers."""
    values = yaml.safe_load(params_file.read_text()) or {}
    port = free_port()
    values["serve"] = {**values.get("serve", {}), "host": "127.0.0.1", "port": port}
    params = workdir / "params.yaml"
    params.write_text(yaml.safe_dump(values))
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "serve-ui",
        "--params",
        str(params),
        *(["--model", model] if model else []),
    ]
    log = (workdir / "server.log").open("wb")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/api/health", timeout=2).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.5)
    stop_server(process)
    sys.exit(f"error: the server did not start:\n{(workdir / 'server.log').read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


# --- the clients -----------------------------------------------------------------------------------


def client(url: str, image: bytes, deadline: float, limit: int, tally: Tally) -> None:
    with requests.Session() as session:
        while time.monotonic() < deadline and tally.claim(limit):
            start = time.perf_counter()
            try:
                response = session.post(
                    f"{url}/api/predict", files={"file": ("image.jpg", image, "image/jpeg")}, timeout=60
                )
                error = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except requests.RequestException as err:
                error = type(err).__name__
            tally.record(time.perf_counter() - start, error)


def run_load(url: str, image: bytes, clients: int, seconds: float, limit: int) -> tuple[Tally, float]:
    tally = Tally()
    started = time.perf_counter()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client, args=(url, image, deadline, limit, tally), daemon=True)
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, time.perf_counter() - started


def report(tally: Tally, elapsed: float, clients: int, url: str, model: str, image_name: str) -> None:
    latencies = np.asarray(tally.latencies) * 1000
    done = len(latencies) + sum(tally.errors.values())
    print(f"server   {url}  model {model}")
    print(f"image    {image_name}")
    print(f"machine  {os.cpu_count()} cores, {platform.machine()}, load average {os.getloadavg()[0]:.2f}")
    print(
        f"clients  {clients}  requests {done} in {elapsed:.1f} s  ->  {done / elapsed:.1f} requests/s "
        f"({len(latencies) / elapsed:.1f} ok/s)"
    )
    if len(latencies):
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        print(f"latency  p50 {p50:.0f} ms  p90 {p90:.0f} ms  p99 {p99:.0f} ms  max {latencies.max():.0f} ms")
    print(f"errors   {sum(tally.errors.values())}" + (f"  {tally.errors}" if tally.errors else ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="base URL of a running server (default: start one)")
    parser.add_argument("--model", help="model for the server started here (default: the champion)")
    parser.add_argument(
        "--params", type=Path, default=REPO / "params.yaml", help="params file for the server started here"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (threads)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to send requests")
    parser.add_argument("--max-requests", type=int, default=5000, help="stop after this many requests in all")
    parser.add_argument(
        "--image", type=Path, help="image to upload (default: A_test.jpg from data/raw, else a generated one)"
    )
    args = parser.parse_args()

    image_name, image = (str(args.image), args.image.read_bytes()) if args.image else default_image()
    with tempfile.TemporaryDirectory(prefix="load-check-") as workdir:
        process, url = (
            (None, args.url.rstrip("/")) if args.url else start_server(args.params, args.model, Path(workdir))
        )
        try:
            health = requests.get(f"{url}/api/health", timeout=10).json()
            model, precision = health["model"], health.get("precision", "fp32")
            run_load(url, image, 1, 60, WARMUP_REQUESTS)  # first requests pay for lazy initialisation
            tally, elapsed = run_load(url, image, args.clients, args.seconds, args.max_requests)
        finally:
            if process is not None:
                stop_server(process)
    described = f"{model['name']} v{model['version']}" if model.get("version") is not None else model["uri"]
    report(tally, elapsed, args.clients, url, f"{described}, forward passes in {precision}", image_name)


if __name__ == "__main__":
    main()
