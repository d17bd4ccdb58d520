"""What the strategies and the training step promise, shown on CPU: DataParallel replicas compute in
the run's precision, options dp cannot honour are refused, and a NaN loss stops an epoch early
without a per-step host sync. (On CUDA, tests/test_gpu.py checks the same on real replicas.)
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.feed import tensor_batches
from pipeline.loop import NAN_CHECK_INTERVAL, NonFiniteLoss, StepSettings, train_one_epoch
from pipeline.serving.networks import build_model
from pipeline.strategy import AutocastForward, Strategy, check_data_parallel_options, make_strategy

CPU = torch.device("cpu")


def _conv_dtype_in_thread(module: nn.Module, probe: nn.Module, thread_autocast) -> torch.dtype:
    """The dtype `probe` (a conv inside `module`) computes in when `module` runs in a new thread that
    enters `thread_autocast`, while the calling thread is inside bf16 autocast (as the loop is)."""
    seen: list[torch.dtype] = []
    handle = probe.register_forward_hook(lambda mod, inputs, output: seen.append(output.dtype))
    x = torch.randn(2, 3, 32, 32)

    def replica() -> None:
        with thread_autocast():
            module(x)

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            worker = threading.Thread(target=replica)
            worker.start()
            worker.join()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(
    "thread_autocast",
    [
        lambda: torch.autocast("cpu", enabled=False),  # a new thread: autocast is per thread
        lambda: torch.autocast("cpu", dtype=torch.float16),  # as parallel_apply re-enters it on CUDA: float16
    ],
    ids=["fresh thread", "thread re-entering autocast with another dtype"],
)
def test_a_dataparallel_replica_runs_the_run_precision_in_its_own_thread(thread_autocast):
    model = build_model("small_cnn", 29)
    conv = model.get_submodule("features.0")
    assert _conv_dtype_in_thread(model, conv, thread_autocast) != torch.bfloat16, (
        "the hazard: the thread's own autocast wins"
    )
    replica = AutocastForward(model, CPU, "bf16")
    assert _conv_dtype_in_thread(replica, conv, thread_autocast) == torch.bfloat16
    assert (
        _conv_dtype_in_thread(
            AutocastForward(model, CPU, "fp32"), conv, lambda: torch.autocast("cpu", enabled=False)
        )
        == torch.float32
    )


def test_unwrap_reaches_the_bare_model_through_the_replica_wrapper():
    model = build_model("small_cnn", 29)
    assert Strategy(CPU).unwrap(nn.DataParallel(AutocastForward(model, CPU, "bf16"))) is model


def test_sync_batchnorm_under_dp_is_refused_in_one_line():
    with pytest.raises(
        UserError, match=r"^train.sync_batchnorm applies only to ddp \(SyncBatchNorm needs a process group"
    ):
        make_strategy("dp", 1, sync_batchnorm=True)


def test_compile_is_refused_for_dataparallel_replicas_and_kept_for_one_device():
    with pytest.raises(
        UserError, match=r"train.compile does not reach DataParallel's 2 replicas.*set train.compile: false"
    ):
        check_data_parallel_options(replicas=2, sync_batchnorm=False, compile_=True)
    # One device, or dp on CPU (one process whatever `gpus` is): the compiled module is the one that runs.
    check_data_parallel_options(replicas=1, sync_batchnorm=False, compile_=True)
    if not torch.cuda.is_available():
        make_strategy("dp", 2, compile_=True)


# --- the step: NaN without a per-step sync -------------------------------------------------------


def _nan_epoch(steps: int, poisoned_step: int) -> tuple[NonFiniteLoss, int]:
    """An epoch of `steps` SGD steps whose `poisoned_step`-th batch holds a NaN pixel; returns the
    error and how many optimizer steps ran before it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 29))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    batch = 4
    images = torch.randn(steps * batch, 3, 4, 4).half()
    images[(poisoned_step - 1) * batch, 0, 0, 0] = float("nan")
    labels = torch.randint(0, 29, (steps * batch,))
    settings = StepSettings(device=CPU, channels_last=False, bf16=False)
    batches = tensor_batches(images, labels, list(np.arange(steps * batch).reshape(steps, batch)), settings)
    with pytest.raises(NonFiniteLoss) as raised:
        train_one_epoch(model, optimizer, scheduler, nn.CrossEntropyLoss(), batches, Strategy(CPU), settings)
    return raised.value, scheduler.last_epoch


def test_a_nan_loss_stops_the_epoch_within_two_check_intervals():
    interval = NAN_CHECK_INTERVAL
    error, ran = _nan_epoch(steps=5 * interval, poisoned_step=3)
    # Looked at after `interval` steps (copied to the host), read `interval` steps later: no step waits.
    assert (error.step, ran) == (interval, 2 * interval)


def test_a_nan_loss_after_the_last_check_is_caught_at_the_end_of_the_epoch():
    steps = NAN_CHECK_INTERVAL + 5
    error, ran = _nan_epoch(steps=steps, poisoned_step=steps - 2)
    assert (error.step, ran) == (steps, steps)
