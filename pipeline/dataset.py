"""The ASL Alphabet data set: its 29 classes in label order, and the Kaggle folder layout.

The index of a name in `CLASSES` is its label everywhere (shards, model outputs, metrics): the
order must never change, or models trained before would silently predict the wrong letters.
"""

from __future__ import annotations

import string
from pathlib import Path

CLASSES: tuple[str, ...] = (*string.ascii_uppercase, "del", "nothing", "space")

KAGGLE_DATASET = "grassknoted/asl-alphabet"
EXTERNAL_KAGGLE_DATASET = "danrasband/asl-alphabet-test"
"""Other signers, other rooms, 30 images per class in class folders: the real data's external test set."""
TRAIN_DIR = "asl_alphabet_train"
TEST_DIR = "asl_alphabet_test"
NO_TEST_IMAGE = frozenset({"del"})
"""Classes that the Kaggle test folder has no image of (it holds 28 `<class>_test.jpg` files)."""


def kaggle_train_dir(root: Path) -> Path:
    """`<root>/asl_alphabet_train/asl_alphabet_train`: Kaggle ships the split folder doubled."""
    return root / TRAIN_DIR / TRAIN_DIR


def kaggle_test_dir(root: Path) -> Path:
    return root / TEST_DIR / TEST_DIR
