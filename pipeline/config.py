"""Typed, validated view of `params.yaml`.

`params.yaml` is the only source of hyperparameters. It is loaded once, by `load_params`, into
frozen dataclasses; every field says what it is for and every section checks its own ranges in
`__post_init__`. A mistake a user can make (unknown key, wrong type, value out of range) raises
`ConfigError`, which the command line turns into one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UserError

STRATEGIES = ("dp", "ddp")
MODEL_NAMES = ("small_cnn", "resnet18", "resnet50", "mobilenet_v3_small")
PROMOTION_METRICS = ("val_accuracy", "val_macro_f1", "val_balanced_accuracy", "val_top3_accuracy")


class ConfigError(UserError):
    """A user-fixable mistake in params.yaml: names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"params: {key}={value!r} is invalid: expected {allowed}")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    images_per_class: int = 100
    """Training frames drawn per class by the built-in generator (plus one test image per class)."""
    frames_per_run: int = 10
    """Length of a run of near-duplicate frames, like the video frames of the real data."""

    def __post_init__(self) -> None:
        _require(self.images_per_class >= 2, "data.synthetic.images_per_class", self.images_per_class, "an integer >= 2")
        _require(self.frames_per_run >= 1, "data.synthetic.frames_per_run", self.frames_per_run, "an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "synthetic"
    """`synthetic` (built in, offline), `kaggle` (needs network and credentials), or a path to a
    `.zip` or folder in the Kaggle layout."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_size: int = 64
    """Side in pixels of the square images written to the shards."""
    val_fraction: float = 0.2
    """Fraction of each class held out for validation."""
    split: Literal["block", "random"] = "block"
    """`block` keeps each run of consecutive frames on one side (honest); `random` leaks neighbours."""
    max_images: int | None = None
    """Stratified cap on the number of training-folder images used (null: all)."""
    block_size: int = 10
    """Consecutive frames per block for the `block` split (the real data has about 3,000 per class)."""
    block_gap: int = 1
    """Training frames dropped on each side of a validation block, so no neighbours straddle the split."""
    shard_size: int = 2048
    """Images per tensor shard: bounds the memory preprocessing needs."""
    max_skipped_fraction: float = 0.05
    """Above this fraction of unreadable files preprocessing fails: the data set is clearly wrong."""
    workers: int | None = None
    """Decoding processes (null: every core)."""

    def __post_init__(self) -> None:
        _require(bool(self.source.strip()), "data.source", self.source, "'synthetic', 'kaggle', or a path to a .zip or folder")
        _require(16 <= self.image_size <= 512, "data.image_size", self.image_size, "an integer from 16 to 512")
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "a number between 0 and 1 (exclusive)")
        _require(self.split in ("block", "random"), "data.split", self.split, "'block' or 'random'")
        _require(self.max_images is None or self.max_images >= 58, "data.max_images", self.max_images, "null or an integer >= 58 (two per class)")
        _require(self.block_size >= 1, "data.block_size", self.block_size, "an integer >= 1")
        _require(self.block_gap >= 0, "data.block_gap", self.block_gap, "an integer >= 0")
        _require(self.shard_size >= 1, "data.shard_size", self.shard_size, "an integer >= 1")
        _require(0.0 <= self.max_skipped_fraction < 1.0, "data.max_skipped_fraction", self.max_skipped_fraction, "a number from 0 up to (not including) 1")
        _require(self.workers is None or self.workers >= 1, "data.workers", self.workers, "null or an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "resnet18"
    """Architecture: one of MODEL_NAMES. `small_cnn` is a tiny net for fast tests."""
    pretrained: bool = False
    """Start from torchvision's ImageNet weights (needs them downloaded or cached)."""
    freeze_backbone: bool = False
    """Train only the classification head, as the original study did."""

    def __post_init__(self) -> None:
        _require(self.name in MODEL_NAMES, "model.name", self.name, "one of " + ", ".join(MODEL_NAMES))


CPU_ALLREDUCE_CHOICES = ("shared_memory", "gloo")


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    nnodes: int = 1
    """Number of machines taking part in a `ddp` run."""
    node_rank: int = 0
    """This machine's rank among `nnodes` (0 on the one that hosts the rendezvous)."""
    rdzv_endpoint: str = "127.0.0.1:29500"
    """host:port of torchrun's rendezvous, reachable from every node."""
    max_restarts: int = 0
    """How often torchrun restarts the workers after a failure; each restart resumes from the last checkpoint."""
    cpu_allreduce: str = "shared_memory"
    """How ddp ranks on CPU average gradients: `shared_memory` (ranks on one machine read each other's
    gradients from shared memory; across machines gloo is used) or `gloo` (TCP). Same result (to the
    bit with 2 ranks; with more, up to the last bit of summation order)."""

    def __post_init__(self) -> None:
        _require(self.nnodes >= 1, "distributed.nnodes", self.nnodes, "an integer >= 1")
        _require(0 <= self.node_rank < self.nnodes, "distributed.node_rank", self.node_rank, f"an integer from 0 to {self.nnodes - 1}")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        _require(bool(host) and port.isdigit() and 0 < int(port) < 65536, "distributed.rdzv_endpoint", self.rdzv_endpoint, "host:port")
        _require(self.max_restarts >= 0, "distributed.max_restarts", self.max_restarts, "an integer >= 0")
        _require(self.cpu_allreduce in CPU_ALLREDUCE_CHOICES, "distributed.cpu_allreduce", self.cpu_allreduce, "'shared_memory' or 'gloo'")
        # Across nodes torchrun's static rendezvous restarts each node on its own, so the nodes'
        # attempts drift apart and the restarted ranks never meet again.
        _require(
            self.nnodes == 1 or self.max_restarts == 0,
            "distributed.max_restarts",
            self.max_restarts,
            "0 when distributed.nnodes > 1 (restarts work on one node; resume a multi-node job with train.resume: true)",
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 5
    """Passes over the training split."""
    batch_size: int = 64
    """Global batch: images per optimizer step, whatever the strategy and `gpus`."""
    lr: float = 0.003
    """Peak learning rate of AdamW (one-cycle schedule: 15% warm-up, then cosine decay)."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    resume: bool = False
    """Continue from the last checkpoint in checkpoints/<strategy>/ if an unfinished one is there."""
    sync_batchnorm: bool = False
    """Convert batch-norm to SyncBatchNorm under ddp, so results do not depend on how a batch is split."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions)."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    data_on_device: bool = True
    """Keep the whole training split on the GPU when it fits."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(0.0 < self.lr <= 10.0, "train.lr", self.lr, "a number in (0, 10]")
        _require(self.weight_decay >= 0.0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _require(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", self.label_smoothing, "a number in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    batch_size: int = 256
    """Images per forward pass during evaluation."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class PromoteConfig:
    metric: str = "val_macro_f1"
    """Metric (higher is better) that decides which model is the candidate and the champion."""
    min_improvement: float = 0.0
    """How much the candidate must beat the champion by to take its place."""

    def __post_init__(self) -> None:
        _require(self.metric in PROMOTION_METRICS, "promote.metric", self.metric, "one of " + ", ".join(PROMOTION_METRICS))
        _require(0.0 <= self.min_improvement <= 1.0, "promote.min_improvement", self.min_improvement, "a number from 0 to 1")


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    experiment: str = "asl-alphabet"
    """MLflow experiment that every stage logs to."""
    registered_model: str = "asl-classifier"
    """Name of the model in the MLflow model registry."""
    system_metrics: bool = True
    """Record CPU, memory and (on NVIDIA machines) per-GPU utilization and memory in training runs,
    as MLflow system metrics (`system/...`), sampled every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10)."""

    def __post_init__(self) -> None:
        _require(bool(self.experiment.strip()), "mlflow.experiment", self.experiment, "a non-empty name")
        _require(bool(self.registered_model.strip()), "mlflow.registered_model", self.registered_model, "a non-empty name")


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    gpu_counts: tuple[int, ...] = (1, 2)
    """GPU counts (processes on CPU) to train each strategy with."""
    strategies: tuple[str, ...] = STRATEGIES
    """Strategies to compare."""
    max_images: int = 10000
    """Fixed sample size (the original study used 10,000)."""
    image_size: int = 64
    """Image side for the study (the original study used 64)."""
    epochs: int = 5
    """Epochs per configuration (the original study used 5)."""

    def __post_init__(self) -> None:
        _require(len(self.gpu_counts) > 0 and all(n >= 1 for n in self.gpu_counts), "scaling.gpu_counts", list(self.gpu_counts), "a non-empty list of integers >= 1")
        _require(len(self.strategies) > 0 and all(s in STRATEGIES for s in self.strategies), "scaling.strategies", list(self.strategies), "a non-empty list of 'dp', 'ddp'")
        _require(self.max_images >= 58, "scaling.max_images", self.max_images, "an integer >= 58")
        _require(16 <= self.image_size <= 512, "scaling.image_size", self.image_size, "an integer from 16 to 512")
        _require(self.epochs >= 1, "scaling.epochs", self.epochs, "an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the web page listens on (loopback by default)."""
    port: int = 8000
    """Port of the web page."""
    max_request_bytes: int = 10_000_000
    """Largest accepted upload."""
    max_image_pixels: int = 40_000_000
    """Largest accepted image (width x height): guards against decompression bombs."""

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, "serve.port", self.port, "an integer from 1 to 65535")
        _require(self.max_request_bytes >= 1024, "serve.max_request_bytes", self.max_request_bytes, "an integer >= 1024")
        _require(self.max_image_pixels >= 1024, "serve.max_image_pixels", self.max_image_pixels, "an integer >= 1024")


@dataclass(frozen=True, kw_only=True)
class Params:
    seed: int = 0
    """Seed for data generation, splitting, initialisation and shuffling."""
    gpus: int = 1
    """GPUs per node for both strategies (processes on a machine without CUDA)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(1 <= self.gpus <= 1024, "gpus", self.gpus, "an integer from 1 to 1024")


# --- building dataclasses from plain YAML values --------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(key, value, _type_name(tp))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, value, _type_name(tp))
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, value, _type_name(tp))
        return tuple(_convert(v, typing.get_args(tp)[0], key) for v in value)
    # bool is a subclass of int: `epochs: true` must not pass as 1.
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(key, value, "an integer")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    if tp is str and not isinstance(value, str):
        raise ConfigError(key, value, "a string")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(prefix + str(key), values[key], "one of the known keys: " + ", ".join(sorted(known)))
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in values.items()}
    return cls(**kwargs)


def params_from_dict(values: dict | None) -> Params:
    """Build and validate `Params` from the parsed YAML; missing keys take their defaults."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError("<top level>", values, "a mapping of keys to values")
    return _build(Params, values)


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `lr: 1e-3` is the *string* '1e-3'. DVC reads params.yaml as
    YAML 1.2, where it is a number; this loader agrees with DVC (quoted values stay strings)."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file; a missing or malformed file is a `ConfigError` too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<file>", str(path), "an existing params.yaml (pass --params PATH)")
    try:
        values = yaml.load(path.read_text(), Loader=_ParamsLoader)  # noqa: S506 -- a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("<file>", str(path), f"valid YAML (parse error{where})") from None
    return params_from_dict(values)


def to_flat_dict(params: Any, prefix: str = "") -> dict[str, Any]:
    """`{'train.lr': 0.003, ...}`: the form MLflow params take."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value, prefix + f.name + "."))
        else:
            flat[prefix + f.name] = list(value) if isinstance(value, tuple) else value
    return flat


def to_yaml_dict(params: Any) -> dict[str, Any]:
    """Nested plain values (tuples as lists) that `params_from_dict` reads back to an equal `Params`."""
    values = dataclasses.asdict(params)

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value

    return plain(values)
