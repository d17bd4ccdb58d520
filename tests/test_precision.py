"""bf16 on CPU: training, validation and the evaluate stage compute in bf16 where the processor does it
natively (AMX, AVX512-BF16), in fp32 elsewhere, and the MLflow run records which precision ran."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.config import load_params, params_from_dict
from pipeline.feed import tensor_batches
from pipeline.loop import train_one_epoch
from pipeline.paths import Paths
from pipeline.serving.precision import native_bf16, precision
from pipeline.strategy import make_strategy
from pipeline.train import run_train
from pipeline.trainer import TrainingState, step_settings

CPU = torch.device("cpu")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture
def without_native_bf16(monkeypatch):
    """This processor as one without AMX or AVX512-BF16: the two features the detection reads."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.skipif(
    not Path("/proc/cpuinfo").is_file(), reason="needs Linux's /proc/cpuinfo to know the processor"
)
def test_native_bf16_is_what_the_processor_advertises():
    assert native_bf16(CPU) == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def test_fp32_where_bf16_is_not_native_or_not_wanted(without_native_bf16):
    assert (precision(CPU, True), precision(CPU, False)) == ("fp32", "fp32")


def _conv_dtype_of_a_training_step(bf16_wanted: bool) -> torch.dtype:
    params = params_from_dict(
        {"model": {"name": "small_cnn"}, "train": {"epochs": 1, "batch_size": 8, "bf16": bf16_wanted}}
    )
    strategy = make_strategy("dp", 1)
    state = TrainingState(params, strategy, 29, steps_per_epoch=2)
    seen: list[torch.dtype] = []
    first_conv = state.bare.get_submodule("features.0")
    first_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    images, labels = torch.randn(16, 3, 32, 32).half(), torch.randint(0, 29, (16,))
    settings = step_settings(params, strategy)
    batches = tensor_batches(images, labels, [np.arange(0, 8), np.arange(8, 16)], settings)
    train_one_epoch(
        state.model, state.optimizer, state.scheduler, nn.CrossEntropyLoss(), batches, strategy, settings
    )
    assert len(seen) == 2
    return seen[0]


def test_a_training_step_computes_in_bf16_where_native():
    expected = torch.bfloat16 if native_bf16(CPU) else torch.float32
    assert _conv_dtype_of_a_training_step(bf16_wanted=True) == expected
    assert _conv_dtype_of_a_training_step(bf16_wanted=False) == torch.float32


def test_a_training_step_stays_fp32_where_bf16_is_not_native(without_native_bf16):
    assert _conv_dtype_of_a_training_step(bf16_wanted=True) == torch.float32


def test_the_run_records_fp32_where_bf16_is_not_native(tiny_workspace, without_native_bf16):
    """(Where it is native, tests/test_train.py and test_evaluate_promote.py find `bf16` recorded.)"""
    params_file = tiny_workspace / "params.yaml"
    paths = Paths(tiny_workspace)
    assert run_train(load_params(params_file), paths, "dp", params_file) == 0
    run_id = json.loads((paths.model_dir("dp") / "run.json").read_text())["run_id"]
    assert json.loads(paths.train_metrics("dp").read_text())["precision"] == "fp32"
    assert MlflowClient().get_run(run_id).data.tags["precision"] == "fp32"
