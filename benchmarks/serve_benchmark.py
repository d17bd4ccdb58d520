"""Both servers side by side: the web page's API (`serve-ui`) and `mlflow models serve` of the same
model, for one or more checkouts of this repository (this one, and an older commit), in one run.

    python benchmarks/serve_benchmark.py                                    # this checkout
    git worktree add /tmp/serve-before <commit>                             # ... against an older one
    python benchmarks/serve_benchmark.py --checkout /tmp/serve-before --checkout .

Each checkout logs a resnet18 (64 px, 29 classes, untrained: the speed is the same) with its own
`log_pyfunc_model`, so that `mlflow models serve` runs that checkout's model code, and registers it
in a scratch store. All servers start at once on free loopback ports, then:

  (a) load: N clients (threads with a keep-alive connection each; default 1, 8 and 32) send a
      200x200 JPEG per request for `--seconds`, after a warm-up; requests/s, p50 and p99 latency,
      and images per CPU-second of the server's processes (what an image costs, whatever share of
      the cores the machine's other work leaves the server; the warm-up counted pro rata).
      serve-ui gets it as a multipart upload (as the page sends it), mlflow models serve as base64
      in a one-row `dataframe_split` (`--rows 8` sends 8 images per request as well). The servers
      take turns at each client count, `--rounds` times, so that drifting load hits all alike.
  (b) memory: 8 clients send one 6300x6300 RGBA PNG each at the same moment, then 8 6300x6300
      JPEGs; the RSS of the server's process tree is sampled every 20 ms: idle before, peak, and
      3 s after the last answer. One server at a time, the others idle.

Clients and servers share the machine's cores: the figures are the whole machine's. The load
average is printed: on a shared machine compare ratios within one run. Always exits 0 unless a
server cannot start (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
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
import psutil
import requests
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WARMUP_S = 3.0
WORST_SIDE = 6300  # 39.7 M pixels: just under serve.max_image_pixels
LOG_MODEL = """
import json, sys, mlflow
from mlflow.tracking import MlflowClient
from pipeline.serving.pyfunc import log_pyfunc_model
mlflow.set_experiment("serve-benchmark")
with mlflow.start_run():
    info = log_pyfunc_model(sys.argv[1], registered_model_name=sys.argv[2])
MlflowClient().set_registered_model_alias(sys.argv[2], "champion", info.registered_model_version)
"""


# --- the model and the images ----------------------------------------------------------------------


def write_model(folder: Path) -> Path:
    """A resnet18 model folder as training writes one (weights + model_config.json)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO))
    from pipeline.dataset import CLASSES
    from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.serving.networks import build_model

    torch.manual_seed(0)
    network = build_model("resnet18", len(CLASSES)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().float().contiguous() for k, v in network.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    config = {
        "model": {"name": "resnet18", "pretrained": False, "freeze_backbone": False},
        "classes": list(CLASSES),
        "image_size": 64,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "max_image_pixels": 40_000_000,
    }
    (folder / "model_config.json").write_text(json.dumps(config))
    return folder


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def ordinary_image() -> bytes:
    gradient = np.linspace(0, 255, 200 * 200 * 3).reshape(200, 200, 3).astype(np.uint8)
    return encode(Image.fromarray(gradient), "JPEG", quality=90)


def worst_images(cache: Path) -> dict[str, bytes]:
    """A 6300x6300 RGBA PNG (stripes and a transparent frame: compresses to ~0.2 MB, decodes to
    159 MB) and a 6300x6300 JPEG of the same picture."""
    png, jpeg = cache / "worst.png", cache / "worst.jpg"
    if not (png.is_file() and jpeg.is_file()):
        y, x = np.mgrid[0:WORST_SIDE, 0:WORST_SIDE]
        pixels = np.zeros((WORST_SIDE, WORST_SIDE, 4), np.uint8)
        pixels[..., 0], pixels[..., 1], pixels[..., 2] = (x // 50 % 2) * 200, (y // 70 % 2) * 180, 90
        pixels[..., 3] = np.where(
            (x - WORST_SIDE / 2) ** 2 + (y - WORST_SIDE / 2) ** 2 < (WORST_SIDE / 3) ** 2, 255, 0
        )
        image = Image.fromarray(pixels, "RGBA")
        png.write_bytes(encode(image, "PNG"))
        jpeg.write_bytes(encode(image.convert("RGB"), "JPEG", quality=90))
    return {"PNG 6300x6300 RGBA": png.read_bytes(), "JPEG 6300x6300": jpeg.read_bytes()}


# --- the servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    kind: str  # "serve-ui" or "mlflow"
    process: subprocess.Popen
    port: int
    log: Path

    def wait_until_up(self, timeout: float = 300) -> None:
        path = "/api/health" if self.kind == "serve-ui" else "/ping"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        sys.exit(f"error: {self.name} did not start:\n{self.log.read_text()[-3000:]}")

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def rss(self) -> int:
        total = 0
        for process in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.tree():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Checkout:
    """`PATH[@KEY=VALUE,...]`: a checkout, with `serve.*` params for its serve-ui and environment
    variables for both its servers (e.g. `.@ASL_SERVING_BF16=0,serve.bf16=false`)."""

    path: Path
    params: dict[str, object]
    env: dict[str, str]
    label: str

    @classmethod
    def parse(cls, spec: str, index: int) -> Checkout:
        where, _, settings = spec.partition("@")
        path = Path(where).resolve()
        params: dict[str, object] = {}
        env: dict[str, str] = {}
        for setting in filter(None, settings.split(",")):
            key, _, value = setting.partition("=")
            if key.startswith("serve."):
                params[key.removeprefix("serve.")] = yaml.safe_load(value)
            else:
                env[key] = value
        name = "this checkout" if path == REPO else path.name
        return cls(path, params, env, f"{name}{' ' + settings if settings else ''}#{index}")


def start_servers(
    checkout: Checkout, model_dir: Path, scratch: Path, env: dict[str, str], kinds: list[str]
) -> list[Server]:
    """Log and register the model with `checkout`'s code, then start both servers on it."""
    index = checkout.label.rpartition("#")[2]
    name, label = f"bench-{index}", checkout.label.rpartition("#")[0]
    env = {**env, **checkout.env}
    code_env = {
        **env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout.path), checkout.env.get("PYTHONPATH")])),
    }
    subprocess.run(
        [sys.executable, "-c", LOG_MODEL, str(model_dir), name],
        cwd=scratch,
        env=code_env,
        check=True,
        capture_output=True,
    )
    uri = f"models:/{name}@champion"
    ui_port, mlflow_port = free_port(), free_port()
    params = scratch / f"params-{index}.yaml"
    params.write_text(yaml.safe_dump({"serve": {**checkout.params, "host": "127.0.0.1", "port": ui_port}}))
    servers = []
    for kind, port, command, cwd, server_env in (
        (
            "serve-ui",
            ui_port,
            [sys.executable, "-m", "pipeline", "serve-ui", "--params", str(params), "--model", uri],
            checkout.path,
            code_env,
        ),
        (
            "mlflow",
            mlflow_port,
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                uri,
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
            ],
            scratch,
            env,  # no PYTHONPATH: the model's own code is imported
        ),
    ):
        if kind not in kinds:
            continue
        log = scratch / f"{kind}-{index}.log"
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=server_env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        servers.append(Server(f"{kind} ({label})", kind, process, port, log))
    return servers


# --- the clients -----------------------------------------------------------------------------------


def request_for(server: Server, images: list[bytes]) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of one request carrying `images` (serve-ui: one image only)."""
    if server.kind == "serve-ui":
        boundary = "benchmarkboundary7f3a"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        body = head.encode() + images[0] + f"\r\n--{boundary}--\r\n".encode()
        return "/api/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    rows = [[base64.b64encode(image).decode("ascii")] for image in images]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
    return "/invocations", body, {"Content-Type": "application/json"}


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.latencies.append(seconds)
            else:
                self.errors[error] = self.errors.get(error, 0) + 1


def client(
    port: int,
    request: tuple[str, bytes, dict[str, str]],
    start: float,
    stop: float,
    tally: Tally,
    barrier: threading.Barrier | None,
) -> None:
    path, body, headers = request
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    if barrier is not None:
        barrier.wait()
    while time.monotonic() < stop:
        began = time.monotonic()
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            error = None if response.status == 200 else f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as err:
            error = type(err).__name__
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        if began >= start:  # the warm-up's requests are not counted
            tally.record(time.monotonic() - began, error)
        if barrier is not None:
            break
    connection.close()


def forward_passes(server: Server) -> dict[str, int] | None:
    """serve-ui's count of forward passes and images so far (None for a server that does not say)."""
    if server.kind != "serve-ui":
        return None
    return requests.get(f"http://127.0.0.1:{server.port}/api/health", timeout=30).json().get("batches")


def run_clients(
    server: Server, request: tuple[str, bytes, dict[str, str]], clients: int, seconds: float
) -> tuple[Tally, float, float]:
    """The tally, the seconds measured, and the server's CPU seconds meanwhile (warm-up included)."""
    tally, now, cpu = Tally(), time.monotonic(), server.cpu_seconds()
    start, stop = now + WARMUP_S, now + WARMUP_S + seconds
    threads = [
        threading.Thread(target=client, args=(server.port, request, start, stop, tally, None))
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, time.monotonic() - start, server.cpu_seconds() - cpu


def load_row(
    server: Server, clients: int, rows: int, tally: Tally, elapsed: float, cpu: float, per_pass: str
) -> str:
    latencies = np.asarray(tally.latencies) * 1000
    p50, p99 = np.percentile(latencies, [50, 99]) if len(latencies) else (float("nan"), float("nan"))
    errors = sum(tally.errors.values())
    per_s = len(latencies) / elapsed
    # Requests per CPU-second of the server: what it costs, whatever share of the cores neighbours leave it.
    per_cpu_s = len(latencies) * (elapsed + WARMUP_S) / elapsed / cpu if cpu else float("nan")
    return (
        f"| {server.name} | {rows} | {clients} | {per_s:.1f} | {per_s * rows:.1f} "
        f"| {p50:.0f} ms | {p99:.0f} ms | "
        f"{per_cpu_s * rows:.0f} | {per_pass} | {errors}{' ' + str(tally.errors) if errors else ''} |"
    )


def measure_memory(server: Server, image_name: str, image: bytes, clients: int = 8) -> str:
    """8 clients send `image` at once; the server tree's RSS: idle, peak, 3 s after."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.rss())
            time.sleep(0.02)

    time.sleep(2)
    idle = server.rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    tally, barrier = Tally(), threading.Barrier(clients)
    request = request_for(server, [image])
    started = time.monotonic()
    threads = [
        threading.Thread(target=client, args=(server.port, request, 0, 1e18, tally, barrier))
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    time.sleep(3)
    done.set()
    sampler.join()
    after = server.rss()
    gib = 1 << 30
    codes = ", ".join(f"{count} x {code}" for code, count in tally.errors.items())
    answered = f"{len(tally.latencies)} x 200" + (f", {codes}" if codes else "")
    return (
        f"| {server.name} | {image_name} | {idle / gib:.2f} GiB | {peak[0] / gib:.2f} GiB "
        f"| +{(peak[0] - idle) / gib:.2f} GiB | "
        f"+{(after - idle) / gib:.2f} GiB | {elapsed:.1f} s | {answered} |"
    )


# --- the run ---------------------------------------------------------------------------------------


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkout",
        action="append",
        help="PATH[@KEY=VALUE,...]: a checkout of this repository (repeatable; default: this one)",
    )
    parser.add_argument(
        "--servers", default="serve-ui,mlflow", help="which servers to measure, comma-separated"
    )
    parser.add_argument("--clients", default="1,8,32", help="client counts for (a), comma-separated")
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="measured seconds per server and client count"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="times every server takes its turn at each client count"
    )
    parser.add_argument(
        "--rows", default="1", help="images per mlflow models serve request, comma-separated (e.g. 1,8)"
    )
    parser.add_argument("--skip-load", action="store_true", help="memory only")
    parser.add_argument("--skip-memory", action="store_true", help="load only")
    args = parser.parse_args()

    checkouts = [Checkout.parse(spec, index) for index, spec in enumerate(args.checkout or [str(REPO)])]
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PYTHONPATH", None)
    print(f"machine  {cpu_name()}, {os.cpu_count()} cores; load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="serve-benchmark-") as tmp:
        scratch = Path(tmp)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
        model_dir = write_model(scratch / "model")
        kinds = args.servers.split(",")
        servers = [
            server
            for checkout in checkouts
            for server in start_servers(checkout, model_dir, scratch, env, kinds)
        ]
        try:
            for server in servers:
                server.wait_until_up()
            print(f"servers up; load average {load_average()}")
            if not args.skip_load:
                run_load(servers, args)
            if not args.skip_memory:
                run_memory(servers, worst_images(Path(tempfile.gettempdir())))
        finally:
            for server in servers:
                server.stop()
    print(f"load average at the end {load_average()}")


def run_load(servers: list[Server], args: argparse.Namespace) -> None:
    ordinary = ordinary_image()
    print(
        "\n| server | images per request | clients | requests/s | images/s | p50 | p99 "
        "| images per server CPU-second | images per forward pass | errors |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for clients in (int(n) for n in args.clients.split(",")):
        for _ in range(args.rounds):
            for server in servers:
                for rows in [int(n) for n in args.rows.split(",")] if server.kind == "mlflow" else [1]:
                    before = forward_passes(server)
                    tally, elapsed, cpu = run_clients(
                        server, request_for(server, [ordinary] * rows), clients, args.seconds
                    )
                    after = forward_passes(server)
                    if before is None or after is None:
                        per_pass = f"{rows} (one request)"
                    else:
                        passes = after["forward_passes"] - before["forward_passes"]
                        per_pass = f"{(after['images'] - before['images']) / max(1, passes):.1f}"
                    print(load_row(server, clients, rows, tally, elapsed, cpu, per_pass), flush=True)
        print(f"<!-- load average {load_average()} -->", flush=True)


def run_memory(servers: list[Server], images: dict[str, bytes]) -> None:
    print(
        "\n| server | 8 concurrent images | idle RSS | peak RSS | peak above idle "
        "| 3 s after, above idle | all answered in | answers |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for server in servers:
        for name, image in images.items():
            print(measure_memory(server, name, image), flush=True)
    print(f"<!-- load average {load_average()} -->", flush=True)


if __name__ == "__main__":
    main()
