"""Typed, validated view of `params.yaml`, the only source of hyperparameters.

`load_params(path)` reads it once into frozen pydantic dataclasses, one per section, each field
documented. Any mistake a user can make raises one `ConfigError` naming the dotted key, the value and
what is allowed; the command line prints it as one line and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, ErrorDetails

from pipeline.errors import UserError
from pipeline.serving import DEFAULT_DECODE_MEMORY_MB, DEFAULT_MAX_IMAGE_PIXELS, MODEL_NAMES

StrategyName = Literal["dp", "ddp"]
PromotionMetric = Literal["val_accuracy", "val_macro_f1", "val_balanced_accuracy", "val_top3_accuracy"]
ExternalMetric = Literal[
    "external_accuracy", "external_macro_f1", "external_balanced_accuracy", "external_top3_accuracy"
]
STRATEGIES: tuple[str, ...] = typing.get_args(StrategyName)
PROMOTION_METRICS: tuple[str, ...] = typing.get_args(PromotionMetric)
EXTERNAL_METRICS: tuple[str, ...] = typing.get_args(ExternalMetric)

# Strict: bool is a subclass of int, so `epochs: true` must not pass as 1, nor `lr: "0.1"` as a number.
# Constraints go inside Annotated so that dataclasses.fields() still shows the plain defaults.
_CONFIG = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)
_LIST = Strict(False)  # YAML gives lists; strict mode would take only tuples (the items stay strict)


class ConfigError(UserError):
    """A user-fixable mistake in params.yaml: names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"params: {key}={value!r} is invalid: expected {allowed}")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class _Section:
    """Base of every section: builds it from a mapping and turns a validation failure into a ConfigError."""

    @model_validator(mode="wrap")
    @classmethod
    def _one_config_error(cls, values: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(values, dict):  # strict mode takes a section only as keyword arguments or an instance
            return _from_mapping(cls, values)
        try:
            return handler(values)
        except ValidationError as err:
            raise _config_error(cls, values, err.errors()[0]) from None


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class SyntheticConfig(_Section):
    images_per_class: Annotated[int, Field(ge=2)] = 100
    """Training frames drawn per class by the built-in generator (plus one test image per class)."""
    frames_per_run: Annotated[int, Field(ge=1)] = 10
    """Length of a run of near-duplicate frames, like the video frames of the real data."""
    external_images_per_class: Annotated[int, Field(ge=1)] = 30
    """Images per class of the generated external test set (`data.external_test: synthetic`), each
    from its own scene: skin tones, backgrounds and lighting that the training frames never use."""


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class DataConfig(_Section):
    source: str = "synthetic"
    """`synthetic` (built in, offline), `kaggle` (needs network and credentials), or a path to a
    `.zip` or folder in the Kaggle layout."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_size: Annotated[int, Field(ge=16, le=512)] = 64
    """Side in pixels of the square images written to the shards."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    """Fraction of each class held out for validation."""
    split: Literal["block", "random"] = "block"
    """`block` keeps each run of consecutive frames on one side (honest); `random` leaks neighbours."""
    max_images: Annotated[int | None, Field(ge=58)] = None
    """Stratified cap on the number of training-folder images used (null: all; at least two per class)."""
    block_size: Annotated[int, Field(ge=1)] = 10
    """Consecutive frames per block for the `block` split (the real data has about 3,000 per class)."""
    block_gap: Annotated[int, Field(ge=0)] = 1
    """Training frames dropped on each side of a validation block, so no neighbours straddle the split."""
    shard_size: Annotated[int | None, Field(ge=1)] = None
    """Images per tensor shard (null: as many as fit in 64 MiB of float16, 2730 at 64 px, 222 at
    224 px; a split smaller than eight such shards is cut into up to eight of at least 256 images, so
    that several preprocessing workers share it). Bounds the memory of each preprocessing worker and
    the unit that streamed training reads."""
    max_skipped_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Above this fraction of unreadable files preprocessing fails: the data set is clearly wrong."""
    workers: Annotated[int | None, Field(ge=1)] = None
    """Preprocessing processes, each holding one shard at a time (null: every core this process may
    run on)."""
    max_image_pixels: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_IMAGE_PIXELS
    """Largest image (width x height) decoded; larger files are skipped and reported like unreadable
    ones (a 657 KB PNG can declare 13000x13000 pixels: 4 GB to decode)."""
    external_test: str | None = "synthetic"
    """Labelled images of other signers, scored apart from the validation split (`external_*`
    figures): `synthetic` (generated scenes the training set never uses; only with `data.source:
    synthetic`), `kaggle` (danrasband/asl-alphabet-test, 30 per class), a path to a `.zip` or folder
    of class folders, or null (none)."""

    def __post_init__(self) -> None:
        allowed = "'synthetic', 'kaggle', or a path to a .zip or folder"
        _require(bool(self.source.strip()), "data.source", self.source, allowed)
        external = self.external_test
        key = "data.external_test"
        _require(external is None or bool(external.strip()), key, external, "null or " + allowed)
        # Drawn hands say nothing about a model of real photos, nor the reverse.
        generated = external is not None and external.strip() == "synthetic"
        mixed = generated and self.source.strip() != "synthetic"
        allowed = "'kaggle', a .zip or folder of class folders, or null (data.source is not synthetic)"
        _require(not mixed, key, external, allowed)


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class ModelConfig(_Section):
    name: str = "resnet18"
    """Architecture: one of MODEL_NAMES. `small_cnn` is a tiny net for fast tests."""
    pretrained: bool = False
    """Start from torchvision's ImageNet weights (needs them downloaded or cached)."""
    freeze_backbone: bool = False
    """Train only the classification head, as the original study did."""

    def __post_init__(self) -> None:
        _require(self.name in MODEL_NAMES, "model.name", self.name, "one of " + ", ".join(MODEL_NAMES))


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class DistributedConfig(_Section):
    nnodes: Annotated[int, Field(ge=1)] = 1
    """Number of machines taking part in a `ddp` run."""
    node_rank: Annotated[int, Field(ge=0)] = 0
    """This machine's rank among `nnodes` (0 on the one that hosts the rendezvous)."""
    rdzv_endpoint: str = "127.0.0.1:29500"
    """host:port of torchrun's rendezvous, reachable from every node."""
    max_restarts: Annotated[int, Field(ge=0)] = 0
    """How often torchrun restarts the workers after a failure; each restart resumes from the last
    checkpoint."""

    def __post_init__(self) -> None:
        rank_allowed = f"an integer from 0 to {self.nnodes - 1}"
        _require(self.node_rank < self.nnodes, "distributed.node_rank", self.node_rank, rank_allowed)
        host, _, port = self.rdzv_endpoint.rpartition(":")
        endpoint_ok = bool(host) and port.isdigit() and 0 < int(port) < 65536
        _require(endpoint_ok, "distributed.rdzv_endpoint", self.rdzv_endpoint, "host:port")
        # Across nodes torchrun's static rendezvous restarts each node on its own, so the nodes'
        # attempts drift apart and the restarted ranks never meet again.
        restarts_ok = self.nnodes == 1 or self.max_restarts == 0
        allowed = "0 when distributed.nnodes > 1 (restarts work on one node; resume a multi-node job with"
        allowed += " train.resume: true)"
        _require(restarts_ok, "distributed.max_restarts", self.max_restarts, allowed)


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class AugmentConfig(_Section):
    """Random changes to each training image, drawn per image and applied to the batch on its device
    (pipeline/augment.py). Validation, test and external images are never augmented."""

    enabled: bool = True
    """Augment the training batches."""
    crop_scale: Annotated[float, Field(gt=0, le=1)] = 0.7
    """Random resized crop: the smallest fraction of the image's area a crop keeps (1: no crop)."""
    rotation_degrees: Annotated[float, Field(ge=0, le=45)] = 10.0
    """Largest rotation either way."""
    brightness: Annotated[float, Field(ge=0, lt=1)] = 0.3
    """Brightness factor drawn from [1 - b, 1 + b]."""
    contrast: Annotated[float, Field(ge=0, lt=1)] = 0.3
    """Contrast factor drawn from [1 - c, 1 + c]."""
    saturation: Annotated[float, Field(ge=0, lt=1)] = 0.3
    """Saturation factor drawn from [1 - s, 1 + s]."""
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    """Hue shift drawn from [-h, h] turns of the colour wheel."""
    horizontal_flip: bool = False
    """Mirror half of the images. Off by default: handedness carries meaning in ASL."""


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class TrainConfig(_Section):
    epochs: Annotated[int, Field(ge=1)] = 5
    """Passes over the training split."""
    batch_size: Annotated[int, Field(ge=1)] = 64
    """Global batch: images per optimizer step, whatever the strategy and `gpus`."""
    lr: Annotated[float, Field(gt=0, le=10)] = 0.003
    """Peak learning rate of AdamW (one-cycle schedule: 15% warm-up, then cosine decay)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    """AdamW weight decay."""
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Cross-entropy label smoothing."""
    resume: bool = False
    """Continue from the last checkpoint in checkpoints/<strategy>/ if an unfinished one is there."""
    sync_batchnorm: bool = False
    """Convert batch-norm to SyncBatchNorm under ddp (CUDA only), so results do not depend on how a batch is
    split; refused under dp, which has no process group."""
    compile: bool = False
    """Wrap the model in torch.compile; refused for dp over several GPUs, whose replicas would not run it."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions)."""
    bf16: bool = True
    """bf16 autocast, for training, validation and the evaluate stage, where the device computes bf16
    natively (CUDA; a CPU with AMX or AVX512-BF16); fp32 elsewhere. Runs are tagged with the precision
    used."""
    data_on_device: bool = True
    """Keep the whole training split on the GPU when it fits."""
    memory_budget_gb: Annotated[float | None, Field(gt=0)] = None
    """Host memory (GB per machine) the training and validation splits may take. Within it the
    shards are memory-mapped (one copy per machine, whatever `gpus` is); beyond it training streams
    them shard by shard through a `shuffle_buffer`. null: half of this machine's memory."""
    shuffle_buffer: Annotated[int, Field(ge=1)] = 4096
    """Images the epoch's shuffle draws from: shards come in a seeded order and each image is drawn
    at random from the next `shuffle_buffer` (a full permutation of a smaller split). The order is
    the same whether the split is memory-mapped or streamed."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class EvaluateConfig(_Section):
    batch_size: Annotated[int, Field(ge=1)] = 256
    """Images per forward pass during evaluation."""


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class PromoteConfig(_Section):
    metric: PromotionMetric | ExternalMetric = "val_macro_f1"
    """Metric (higher is better) that decides which model is the candidate and the champion; an
    `external_*` one decides on the external test set (which must then exist)."""
    min_improvement: Annotated[float, Field(ge=0, le=1)] = 0.0
    """How much the candidate must beat the champion by to take its place."""
    external_metric: ExternalMetric | None = "external_macro_f1"
    """With an external test set, the candidate must also be no worse than the champion on this
    metric, both scored on that set (null, or the same as `metric`: no such guard)."""


# What MLflow's registry takes, and what its search filters (`name = '...'`) quote safely.
_REGISTERED_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class MlflowConfig(_Section):
    experiment: str = "asl-alphabet"
    """MLflow experiment that every stage logs to."""
    registered_model: str = "asl-classifier"
    """Name of the model in the MLflow model registry."""
    system_metrics: bool = True
    """Record CPU, memory and (on NVIDIA machines) per-GPU utilization and memory in training runs,
    as MLflow system metrics (`system/...`), sampled every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    seconds (10)."""

    def __post_init__(self) -> None:
        _require(bool(self.experiment.strip()), "mlflow.experiment", self.experiment, "a non-empty name")
        name_ok = _REGISTERED_MODEL_NAME.fullmatch(self.registered_model) is not None
        allowed = "a name of letters, digits, '.', '_' and '-' that starts with a letter or digit"
        _require(name_ok, "mlflow.registered_model", self.registered_model, allowed)


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class ScalingConfig(_Section):
    gpu_counts: Annotated[tuple[Annotated[int, Field(ge=1)], ...], _LIST, Field(min_length=1)] = (1, 2)
    """GPU counts (processes on CPU) to train each strategy with."""
    strategies: Annotated[tuple[StrategyName, ...], _LIST, Field(min_length=1)] = ("dp", "ddp")
    """Strategies to compare."""
    max_images: Annotated[int, Field(ge=58)] = 10000
    """Fixed sample size (the original study used 10,000)."""
    image_size: Annotated[int, Field(ge=16, le=512)] = 64
    """Image side for the study (the original study used 64)."""
    epochs: Annotated[int, Field(ge=1)] = 5
    """Epochs per configuration (the original study used 5)."""


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class ServeConfig(_Section):
    host: str = "127.0.0.1"
    """Address the web page listens on (loopback by default)."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    """Port of the web page."""
    max_request_bytes: Annotated[int, Field(ge=1024)] = 10_000_000
    """Largest accepted upload."""
    max_image_pixels: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_IMAGE_PIXELS
    """Largest accepted image (width x height): guards against decompression bombs."""
    decode_memory_mb: Annotated[int, Field(ge=16)] = DEFAULT_DECODE_MEMORY_MB
    """Memory that all decodes together may hold (a 6300x6300 PNG needs about 160 MB): a decode waits
    for room; an image that alone needs more is refused with 413."""
    decode_threads: Annotated[int, Field(ge=1, le=256)] | None = None
    """Threads decoding uploads (null: one per core, at most 4)."""
    torch_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Threads of each forward pass (null: one less than the cores, at least one: the core left over
    serves HTTP and decodes, rather than stalling the forward pass's threads by competing with them)."""
    max_pending: Annotated[int, Field(ge=1)] = 64
    """Requests held at once (uploading, waiting, decoding, classifying); more are answered 503 with
    Retry-After. Their uploads take up to max_pending x max_request_bytes."""
    max_batch: Annotated[int, Field(ge=1, le=1024)] = 32
    """Most images in one forward pass: concurrent requests are classified together."""
    batch_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 5.0
    """Longest a forward pass waits for the images of requests still being decoded (never when none is)."""
    bf16: bool = True
    """bf16 forward passes where the processor computes bf16 natively (AVX512-BF16 or AMX, CUDA), fp32
    elsewhere; false: fp32 always. Answers and /api/health say which (`precision`)."""


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class Params(_Section):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    """Seed for data generation, splitting, initialisation and shuffling (numpy takes up to 2**32 - 1)."""
    gpus: Annotated[int, Field(ge=1, le=1024)] = 1
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


# --- pydantic's first error as one ConfigError --------------------------------------------------


def _section_keys(cls: type, prefix: str = "") -> dict[type, str]:
    """`{DataConfig: 'data.', SyntheticConfig: 'data.synthetic.', ...}`: where each section sits."""
    keys = {cls: prefix}
    for name, info in cls.__pydantic_fields__.items():  # type: ignore[attr-defined]
        if isinstance(info.annotation, type) and dataclasses.is_dataclass(info.annotation):
            keys |= _section_keys(info.annotation, f"{prefix}{name}.")
    return keys


_SECTION_KEYS = _section_keys(Params)


def _from_mapping(cls: type, values: dict) -> Any:
    # YAML keys can be numbers or booleans (`on:`); as strings they are refused as unknown keys.
    return cls(**{str(key): value for key, value in values.items()})


def _config_error(cls: type, values: Any, error: ErrorDetails) -> ConfigError:
    """Name the full dotted key and show the whole value, the list rather than its bad item."""
    prefix = _SECTION_KEYS[cls]
    if not error["loc"]:
        return ConfigError(prefix.rstrip(".") or "<top level>", error["input"], "a mapping")
    name = error["loc"][0]
    given: dict[Any, Any] = (values.kwargs or {}) if isinstance(values, ArgsKwargs) else {}
    return ConfigError(f"{prefix}{name}", given.get(name, error["input"]), _allowed(cls, error))


_WORDS = {
    "bool_type": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "too_short": "a non-empty list",
}
_NOUNS = {"int_type": "an integer", "float_type": "a number", "finite_number": "a finite number"}
_RANGES = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _allowed(cls: type, error: ErrorDetails) -> str:
    """What the failing field takes, in plain words: its type, and its whole range where it has one."""
    kind, ctx, (name, *item) = error["type"], error.get("ctx", {}), error["loc"]
    if kind == "unexpected_keyword_argument":
        return "one of the known keys: " + ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    info = cls.__pydantic_fields__.get(name)  # type: ignore[attr-defined]
    if kind == "literal_error":
        words = ctx["expected"]
    elif kind in _NOUNS or kind in _RANGES:
        words = _number(kind, ctx, info.metadata if info and not item else [])
    else:
        words = _WORDS.get(kind, error["msg"])
    if item:
        return f"a list whose items are each {words}"
    return f"null or {words}" if info and type(None) in typing.get_args(info.annotation) else words


def _number(kind: str, ctx: dict[str, Any], metadata: list) -> str:
    """'an integer from 16 to 512', 'a number in (0, 10]', 'a finite number >= 0', ..."""
    # pydantic passes a float field's bounds as floats: ints in the error mean an integer field.
    noun = _NOUNS.get(kind) or ("an integer" if all(type(v) is int for v in ctx.values()) else "a number")
    bounds = {**ctx, **{k: getattr(m, k) for m in metadata for k in _SIGNS if hasattr(m, k)}}
    if noun == "an integer" and bounds.keys() == {"ge", "le"}:
        return f"an integer from {bounds['ge']} to {bounds['le']}"
    if len(bounds) == 2:
        low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}"
        high = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})"
        return f"{noun} in {low}, {high}"
    return " ".join([noun, *(f"{_SIGNS[k]} {v}" for k, v in bounds.items())])


# --- reading the file ---------------------------------------------------------------------------


def params_from_dict(values: dict | None) -> Params:
    """Build and validate `Params` from the parsed YAML; missing keys take their defaults."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError("<top level>", values, "a mapping of keys to values")
    return _from_mapping(Params, values)


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `lr: 1e-3` is the *string* '1e-3'. DVC reads params.yaml as
    YAML 1.2, where it is a number; this loader agrees with DVC (quoted values stay strings). Like DVC,
    it refuses a repeated key, of which PyYAML would silently keep the last value."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_repeated_keys(node, "", set())
        return super().construct_document(node)

    def _refuse_repeated_keys(self, node: yaml.Node, prefix: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias to a node already checked, perhaps its own ancestor
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._refuse_repeated_keys(item, prefix, seen)
        if not isinstance(node, yaml.MappingNode):
            return
        keys: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key_node, yaml.ScalarNode):  # a list or mapping as a key: PyYAML refuses it
                continue
            if key in keys:
                value = self.construct_object(value_node, deep=True)
                line = key_node.start_mark.line + 1
                allowed = f"each key once in its mapping (line {line} repeats it; DVC refuses a repeated key)"
                raise ConfigError(f"{prefix}{key}", value, allowed)
            keys.add(key)
            self._refuse_repeated_keys(value_node, f"{prefix}{key}.", seen)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file; a missing, unreadable or malformed file is a `ConfigError` too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<file>", str(path), "an existing params.yaml (pass --params PATH)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError("<file>", str(path), f"UTF-8 text (byte {err.start} is not UTF-8)") from None
    try:
        values = yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 -- a SafeLoader
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
    return TypeAdapter(type(params)).dump_python(params, mode="json")
