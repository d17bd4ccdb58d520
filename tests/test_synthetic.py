"""The synthetic data set must look like the Kaggle one to the pipeline, and be a fair task:
shaped like the real layout, reproducible, leaky across near-duplicate frames, not solvable by
colour, but learnable from shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.dataset import CLASSES, kaggle_test_dir, kaggle_train_dir
from pipeline.synthetic import (
    EXTERNAL_SCENES,
    TRAINING_SCENES,
    generate_external_set,
    generate_synthetic_dataset,
    random_scene,
)

TRAIN_DIR, TEST_DIR = kaggle_train_dir(Path()), kaggle_test_dir(Path())  # relative to a data/raw folder

RUN = 5  # frames per run in the shared data set
PER_CLASS = 40


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("asl")
    generate_synthetic_dataset(root, images_per_class=PER_CLASS, frames_per_run=RUN, seed=0, workers=2)
    return root


def _frame(root: Path, name: str, number: int, size: int | None = None) -> np.ndarray:
    image: Image.Image = Image.open(root / TRAIN_DIR / name / f"{name}{number}.jpg")
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writes_the_kaggle_layout(tmp_path: Path) -> None:
    written = generate_synthetic_dataset(tmp_path, images_per_class=5, frames_per_run=2, workers=2)

    assert written == 29 * 5 + 28
    assert sorted(p.name for p in (tmp_path / TRAIN_DIR).iterdir()) == sorted(CLASSES)
    for name in CLASSES:
        assert sorted(p.name for p in (tmp_path / TRAIN_DIR / name).iterdir()) == sorted(
            f"{name}{n}.jpg" for n in range(1, 6)
        )
    tests = sorted(p.name for p in (tmp_path / TEST_DIR).iterdir())
    assert tests == sorted(f"{name}_test.jpg" for name in CLASSES if name != "del")
    assert len(_all_files(tmp_path)) == written, "no temporary or extra files may be left behind"
    for path in [*(tmp_path / TRAIN_DIR).rglob("*.jpg"), *(tmp_path / TEST_DIR).glob("*.jpg")]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (200, 200))


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    generate_synthetic_dataset(tmp_path / "a", images_per_class=3, seed=7, workers=1)
    generate_synthetic_dataset(tmp_path / "b", images_per_class=3, seed=7, workers=2)
    generate_synthetic_dataset(tmp_path / "c", images_per_class=3, seed=8, workers=2)
    a, b, c = (_all_files(tmp_path / d) for d in "abc")

    assert a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a)


def test_frames_of_a_run_are_near_duplicates(dataset: Path) -> None:
    within, across = [], []
    for name in CLASSES:
        for start in range(1, PER_CLASS - RUN + 1, RUN):
            first = _frame(dataset, name, start)
            within.append(np.abs(first - _frame(dataset, name, start + 1)).mean())
            across.append(np.abs(first - _frame(dataset, name, start + RUN)).mean())

    assert np.mean(within) < 0.5 * np.mean(across)
    assert np.median(within) < np.percentile(across, 10)


def test_mean_colour_does_not_give_the_class_away(dataset: Path) -> None:
    def mean_colours(frames: range) -> np.ndarray:
        return np.array([[_frame(dataset, name, n).mean(axis=(0, 1)) for n in frames] for name in CLASSES])

    half = PER_CLASS // 2  # a multiple of RUN: no run is on both sides
    train, held_out = mean_colours(range(1, half + 1)), mean_colours(range(half + 1, PER_CLASS + 1))
    centroids = train.mean(axis=1)
    distances = np.linalg.norm(held_out[:, :, None, :] - centroids[None, None], axis=-1)
    accuracy = (distances.argmin(axis=-1) == np.arange(len(CLASSES))[:, None]).mean()

    assert accuracy < 0.3  # chance is 1/29 = 0.034


def _small_cnn() -> nn.Module:
    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 4 * 4, len(CLASSES))
    )


def test_shapes_are_learnable_on_held_out_runs(dataset: Path) -> None:
    torch.manual_seed(0)
    images = np.array(
        [[_frame(dataset, name, n, size=32) for n in range(1, PER_CLASS + 1)] for name in CLASSES]
    )
    x = torch.from_numpy(images).permute(0, 1, 4, 2, 3)
    # Per-image, per-channel standardisation: the shape has to carry the class, not the colour.
    x = (x - x.mean(dim=(3, 4), keepdim=True)) / (x.std(dim=(3, 4), keepdim=True) + 1e-3)
    y = torch.arange(len(CLASSES))[:, None].expand(-1, PER_CLASS)
    split = PER_CLASS - 2 * RUN  # the last two whole runs of every class are held out
    x_train, y_train = x[:, :split].flatten(0, 1), y[:, :split].flatten()
    x_val, y_val = x[:, split:].flatten(0, 1), y[:, split:].flatten()

    model = _small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(12):
        model.train()
        for batch in torch.randperm(len(y_train)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_val).argmax(dim=1) == y_val).float().mean().item()

    assert accuracy > 0.5, f"validation accuracy {accuracy:.2f} on held-out runs"


# --- the external test set -------------------------------------------------------------------------


def _overlaps(first: tuple[float, float], second: tuple[float, float]) -> bool:
    return first[0] <= second[1] and second[0] <= first[1]


def test_external_scenes_share_no_setting_with_training() -> None:
    assert not set(EXTERNAL_SCENES.backgrounds) & set(TRAINING_SCENES.backgrounds)
    assert not set(EXTERNAL_SCENES.lights) & set(TRAINING_SCENES.lights)
    assert not any(_overlaps(a, b) for a in EXTERNAL_SCENES.skin_tones for b in TRAINING_SCENES.skin_tones)
    # And the generator draws within them: many scenes of each, as the writers draw them.
    for style, other in ((TRAINING_SCENES, EXTERNAL_SCENES), (EXTERNAL_SCENES, TRAINING_SCENES)):
        seen = [random_scene(np.random.default_rng([0, n]), 64, style) for n in range(200)]
        assert {s.background_kind for s in seen} == set(style.backgrounds)
        assert {s.light_kind for s in seen} == set(style.lights)
        assert all(any(low <= s.tone <= high for low, high in style.skin_tones) for s in seen)
        assert not any(low <= s.tone <= high for s in seen for low, high in other.skin_tones)


def test_external_set_is_class_folders_and_reproducible(tmp_path: Path) -> None:
    written = generate_external_set(tmp_path / "a", images_per_class=3, seed=0, workers=2)
    generate_external_set(tmp_path / "b", images_per_class=3, seed=0, workers=1)
    assert written == 29 * 3
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(CLASSES)
    assert _all_files(tmp_path / "a") == _all_files(tmp_path / "b")
    assert all(len(list((tmp_path / "a" / name).glob("*.jpg"))) == 3 for name in CLASSES)
    generate_external_set(tmp_path / "c", images_per_class=3, seed=1, workers=2)
    assert (
        _all_files(tmp_path / "c").keys() == _all_files(tmp_path / "a").keys() != _all_files(tmp_path / "c")
    )
