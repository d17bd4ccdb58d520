"""`params.yaml` -> typed, frozen `Params`: the shipped file loads, and every user mistake is one
line naming the key, the bad value and what is allowed (exit code 2 on the command line)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ConfigError, Params, load_params, params_from_dict
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# --- the shipped file ---------------------------------------------------------------------------


def _check_against_file(obj: Any, raw: dict, prefix: str = "") -> list[str]:
    """Every field the file sets has the file's value; every field it leaves out has the default."""
    checked = []
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            checked += _check_against_file(value, raw.get(f.name) or {}, key + ".")
        elif f.name in raw:
            expected = raw[f.name]
            assert value == (tuple(expected) if isinstance(expected, list) else expected), key
            checked.append(key)
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert value == default, f"{key}: the file is silent, so it must keep the default {default!r}"
            checked.append(key)
    return checked


def test_shipped_params_load_and_match_the_file() -> None:
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())

    assert isinstance(params, Params)
    checked = _check_against_file(params, raw)
    expected = {"seed", "gpus", "data.image_size", "train.epochs", "scaling.gpu_counts", "serve.port"}
    assert expected <= set(checked)
    assert isinstance(params.scaling.gpu_counts, tuple) and isinstance(params.train.lr, float)


def test_an_empty_file_means_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("# nothing set\n")
    assert load_params(path) == Params()
    assert params_from_dict({"train": {"epochs": 2}}).train == dataclasses.replace(Params().train, epochs=2)


def test_params_are_frozen() -> None:
    params = load_params(REPO / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.epochs = 100  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.data = params.data  # type: ignore[misc]


def test_scientific_notation_is_a_number_as_dvc_reads_it(tmp_path: Path) -> None:
    # PyYAML alone (YAML 1.1) would read `1e-3` as the string '1e-3' and reject it; DVC reads it as 0.001.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5.0E-2\nmlflow:\n  experiment: '1e3'\n")
    params = load_params(path)
    assert params.train.lr == pytest.approx(0.001)
    assert params.train.weight_decay == pytest.approx(0.05)
    assert params.mlflow.experiment == "1e3", "a quoted value stays a string"


# --- user mistakes ------------------------------------------------------------------------------

MISTAKES = [
    # (YAML text, key the message must name, bad value as the message shows it)
    ("gpu: 2", "gpu", "2"),  # unknown top-level key (meant `gpus`)
    ("train:\n  epoch: 5", "train.epoch", "5"),  # unknown nested key
    ("data:\n  synthetic:\n    images: 5", "data.synthetic.images", "5"),  # unknown key two levels down
    ('train:\n  epochs: "5"', "train.epochs", "'5'"),  # a string where an integer belongs
    ("train:\n  lr: fast", "train.lr", "'fast'"),
    ("gpus: 1.5", "gpus", "1.5"),
    ('train:\n  resume: "yes"', "train.resume", "'yes'"),
    ("train:\n  epochs: true", "train.epochs", "True"),  # bool is an int in Python; not here
    ("train:\n  epochs: 0", "train.epochs", "0"),
    ("gpus: 0", "gpus", "0"),
    ("seed: -1", "seed", "-1"),
    ("data:\n  val_fraction: 1.5", "data.val_fraction", "1.5"),
    ("data:\n  image_size: 8", "data.image_size", "8"),
    ("data:\n  workers: 0", "data.workers", "0"),
    ("data:\n  max_images: 10", "data.max_images", "10"),
    ("data:\n  split: blocks", "data.split", "'blocks'"),
    ("model:\n  name: resnet19", "model.name", "'resnet19'"),
    ("promote:\n  metric: loss", "promote.metric", "'loss'"),
    ("train: 5", "train", "5"),  # a section that is not a mapping
    ("data:\n  synthetic: [1, 2]", "data.synthetic", "[1, 2]"),
    ('distributed:\n  rdzv_endpoint: "nohost"', "distributed.rdzv_endpoint", "'nohost'"),
    ('distributed:\n  rdzv_endpoint: "host:99999"', "distributed.rdzv_endpoint", "'host:99999'"),
    ("distributed:\n  node_rank: 3", "distributed.node_rank", "3"),  # with the default nnodes: 1
    ("distributed:\n  cpu_allreduce: gloo", "distributed.cpu_allreduce", "'gloo'"),  # a removed param
    ("scaling:\n  gpu_counts: []", "scaling.gpu_counts", "[]"),
    ("scaling:\n  gpu_counts: [1, 0]", "scaling.gpu_counts", "[1, 0]"),
    ("scaling:\n  strategies: [dp, horovod]", "scaling.strategies", "horovod"),
    ("serve:\n  port: 70000", "serve.port", "70000"),
    ("train:\n  memory_budget_gb: 0", "train.memory_budget_gb", "0"),
    ("train:\n  shuffle_buffer: 0", "train.shuffle_buffer", "0"),
    ("data:\n  shard_size: 0", "data.shard_size", "0"),
    ("- just\n- a list", "<top level>", "['just', 'a list']"),
    ('train:\n  lr: "0.1"', "train.lr", "'0.1'"),  # a quoted number is a string
    ("train:\n  epochs: null", "train.epochs", "None"),  # null only where the type allows it
    ("data:\n  synthetic: null", "data.synthetic", "None"),
    ("train:\n  weight_decay: .inf", "train.weight_decay", "inf"),
    ("train:\n  lr: .nan", "train.lr", "nan"),
    ("promote:\n  min_improvement: -.inf", "promote.min_improvement", "-inf"),
    ("seed: 4294967296", "seed", "4294967296"),  # 2**32: numpy's seeding would fail only in training
    ('mlflow:\n  registered_model: "asl\'model"', "mlflow.registered_model", "asl'model"),
    ("mlflow:\n  experiment: ' '", "mlflow.experiment", "' '"),
]


def _assert_one_line(err: ConfigError, key: str, shown: str) -> None:
    message = str(err)
    assert "\n" not in message and message.strip() == message and message, f"not one line: {message!r}"
    assert key in message, f"{message!r} does not name {key}"
    assert shown in message, f"{message!r} does not show the bad value {shown}"
    assert "expected" in message, f"{message!r} does not say what is allowed"
    assert isinstance(err, UserError)


@pytest.mark.parametrize(("text", "key", "shown"), MISTAKES, ids=[m[1] + ":" + m[2] for m in MISTAKES])
def test_mistake_is_one_line_naming_key_and_value(tmp_path: Path, text: str, key: str, shown: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    _assert_one_line(info.value, key, shown)
    assert info.value.key == key


def test_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        params_from_dict({"train": {"epoch": 5}})
    assert "epochs" in info.value.allowed and "batch_size" in info.value.allowed


def test_node_rank_is_checked_against_nnodes() -> None:
    assert params_from_dict({"distributed": {"nnodes": 4, "node_rank": 3}}).distributed.node_rank == 3
    with pytest.raises(ConfigError) as info:
        params_from_dict({"distributed": {"nnodes": 4, "node_rank": 4}})
    _assert_one_line(info.value, "distributed.node_rank", "4")
    assert "0 to 3" in str(info.value)


def test_types_are_strict_but_an_integer_is_a_number() -> None:
    params = params_from_dict({"train": {"lr": 1}, "scaling": {"gpu_counts": [4]}})
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.scaling.gpu_counts == (4,), "a YAML list becomes a tuple"
    assert params_from_dict({"data": {"workers": None}}).data.workers is None
    assert params_from_dict({"train": {"memory_budget_gb": 8}}).train.memory_budget_gb == 8.0
    for section, name, value in [("train", "lr", True), ("scaling", "gpu_counts", [1, True])]:
        with pytest.raises(ConfigError) as info:
            params_from_dict({section: {name: value}})
        assert info.value.key == f"{section}.{name}", "true is not a number, nor an integer"


FLOAT_KEYS = ["train.weight_decay", "train.lr", "data.val_fraction", "promote.min_improvement"]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused(key: str, value: float) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        params_from_dict({section: {name: value}})
    assert info.value.key == key
    assert info.value.allowed.startswith("a finite number"), info.value.allowed


def test_seed_fits_numpy() -> None:
    assert params_from_dict({"seed": 2**32 - 1}).seed == 2**32 - 1
    with pytest.raises(ConfigError) as info:
        params_from_dict({"seed": 2**32})
    assert info.value.key == "seed" and "4294967295" in info.value.allowed


@pytest.mark.parametrize("name", ["asl'classifier", "-asl", "asl classifier", "asl/classifier", ""])
def test_registered_model_name_is_safe_for_the_registry(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        params_from_dict({"mlflow": {"registered_model": name}})
    assert info.value.key == "mlflow.registered_model" and info.value.value == name
    assert "letters, digits" in info.value.allowed


def test_registered_model_and_experiment_names_that_are_fine() -> None:
    names = {"registered_model": "ASL.v2_cnn-1", "experiment": "Bob's runs / 2"}
    mlflow = params_from_dict({"mlflow": names}).mlflow
    assert (mlflow.registered_model, mlflow.experiment) == ("ASL.v2_cnn-1", "Bob's runs / 2")


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes("mlflow:\n  experiment: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    _assert_one_line(info.value, str(path), str(path))
    assert info.value.key == "<file>" and "UTF-8" in info.value.allowed


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("train:\n  epochs: 1\nseed: 0\ntrain:\n  epochs: 3\n", "train", 4),
        ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "train.lr", 4),
        ("data:\n  synthetic:\n    block: 2\n    'block': 3\n", "data.synthetic.block", 4),
    ],
    ids=["top-level", "nested", "two-levels-quoted"],
)
def test_a_repeated_key_is_refused_as_dvc_does(tmp_path: Path, text: str, key: str, line: int) -> None:
    # PyYAML alone keeps the last value without a word; DVC refuses the file.
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert info.value.key == key
    assert f"line {line}" in info.value.allowed, info.value.allowed
    assert "\n" not in str(info.value)


def test_replace_validates_again() -> None:
    params = Params()
    assert dataclasses.replace(params.data, max_images=58).max_images == 58
    assert dataclasses.replace(params.scaling, gpu_counts=[3]).gpu_counts == (3,)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(params.data, max_images=10)
    assert info.value.key == "data.max_images" and info.value.value == 10
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(params, gpus=2048)
    assert info.value.key == "gpus"
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(params.train, epochs="5")  # type: ignore[arg-type]  # types too, not only ranges
    assert info.value.key == "train.epochs" and info.value.value == "5"
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(params.distributed, nnodes=2, max_restarts=1)
    assert info.value.key == "distributed.max_restarts"


def test_every_field_is_documented() -> None:
    def fields(cls: Any) -> list[tuple[str, Any]]:
        found: list[tuple[str, Any]] = []
        for name, info in cls.__pydantic_fields__.items():
            found += fields(info.annotation) if dataclasses.is_dataclass(info.annotation) else [(name, info)]
        return found

    undocumented = [name for name, info in fields(Params) if not info.description]
    assert not undocumented and len(fields(Params)) > 40, undocumented


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 5\n  lr: [0.1\nmodel: x\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    _assert_one_line(info.value, str(path), str(path))
    assert "YAML" in str(info.value) and "line" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_params(path)
    _assert_one_line(info.value, str(path), str(path))
    assert "--params" in str(info.value)


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  epochs: '5'\n", "train.epochs"),
        ("gpu: 2\n", "gpu"),
        ("data: [1\n", "bad.yaml"),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", "train.lr"),
    ],
    ids=["wrong-type", "unknown-key", "malformed", "repeated-key"],
)
def test_cli_reports_a_bad_params_file_in_one_line(tmp_path: Path, text: str, key: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "preprocess", "--params", "bad.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith("error:") and key in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists(), "nothing may be written when the params are bad"
