"""The web page's model thread: images of concurrent requests share one forward pass, the answers
are each request's own (as if run alone), a batch never exceeds its maximum, and a lone request
never waits for company. The forward pass is a served model's own (`AslClassifier.probabilities`
of an untrained small CNN: what matters here is which images share a pass, not what they show).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch
from mlflow.pyfunc import PythonModelContext

from pipeline.batcher import Batcher
from pipeline.dataset import CLASSES
from pipeline.serving.networks import build_model
from pipeline.serving.precision import precision
from pipeline.serving.pyfunc import CONFIG_FILE, WEIGHTS_FILE, AslClassifier

from serving_support import COLOURS, SIZE, write_model_dir


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> AslClassifier:
    torch.manual_seed(0)
    folder = write_model_dir(
        tmp_path_factory.mktemp("batching") / "model", build_model("small_cnn", len(CLASSES)).eval()
    )
    loaded = AslClassifier()
    loaded.load_context(
        PythonModelContext({"weights": str(folder / WEIGHTS_FILE), "config": str(folder / CONFIG_FILE)}, None)
    )
    return loaded


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    colours = list(COLOURS.values())
    return [
        np.clip(np.asarray(colours[i % 3]) + rng.integers(-60, 60, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        for i in range(count)
    ]


def _run_together(batcher: Batcher, images: list[np.ndarray]) -> list[np.ndarray]:
    """Submit `images` as requests that were all being decoded at once."""
    with contextlib.ExitStack() as stack:
        decoding = [stack.enter_context(contextlib.ExitStack()) for _ in images]
        for request in decoding:
            request.enter_context(batcher.coming())
        answers = []
        for image, request in zip(images, decoding, strict=True):
            answers.append(batcher.submit(image))
            request.close()  # this request's decode is over: it submitted
    return [answer.result(timeout=60) for answer in answers]


@pytest.mark.parametrize(("bf16", "tolerance"), [(False, 1e-6), (True, 1e-2)])
def test_one_forward_pass_answers_each_as_if_alone(
    classifier: AslClassifier, bf16: bool, tolerance: float
) -> None:
    classifier.precision = precision(torch.device("cpu"), bf16)
    images = _images(8)
    alone = [classifier.probabilities(image[None])[0] for image in images]
    batcher = Batcher(classifier.probabilities, max_batch=32, wait_s=10)
    try:
        together = _run_together(batcher, images)
    finally:
        batcher.close()
    assert batcher.batch_sizes == {8: 1}
    np.testing.assert_allclose(np.stack(together), np.stack(alone), atol=tolerance)


def test_batches_never_exceed_the_maximum(classifier: AslClassifier) -> None:
    batcher = Batcher(classifier.probabilities, max_batch=4, wait_s=10)
    try:
        assert len(_run_together(batcher, _images(10))) == 10
    finally:
        batcher.close()
    assert batcher.batch_sizes == {4: 2, 2: 1}


def test_a_lone_request_does_not_wait_for_company(classifier: AslClassifier) -> None:
    batcher = Batcher(classifier.probabilities, max_batch=32, wait_s=30)
    try:
        started = time.monotonic()
        batcher.submit(_images(1)[0]).result(timeout=60)
        assert time.monotonic() - started < 10  # far below the 30 s it could wait
    finally:
        batcher.close()


def test_a_failed_forward_pass_fails_its_requests_and_the_next_batch_runs(classifier: AslClassifier) -> None:
    batcher = Batcher(classifier.probabilities, max_batch=32, wait_s=0)
    try:
        wrong = batcher.submit(np.zeros((SIZE, SIZE), np.uint8))  # no colour channels: the network refuses it
        with pytest.raises(Exception):  # noqa: B017 -- whatever torch raises, the request gets it
            wrong.result(timeout=60)
        assert batcher.submit(_images(1)[0]).result(timeout=60).shape == (len(classifier.classes),)
    finally:
        batcher.close()


def test_a_request_whose_client_left_is_skipped(classifier: AslClassifier) -> None:
    batcher = Batcher(classifier.probabilities, max_batch=32, wait_s=10)
    try:
        with batcher.coming():
            gone = batcher.submit(_images(1)[0])
            assert gone.cancel()
            kept = batcher.submit(_images(2)[1])
        assert kept.result(timeout=60).shape == (len(classifier.classes),)
    finally:
        batcher.close()
    assert batcher.batch_sizes == {1: 1}
