"""End-of-epoch checkpoints in `checkpoints/<strategy>/last.pt`: outside DVC's outputs, which DVC
deletes before a rerun; written atomically; refused on resume when made with other params or data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_bytes


def checkpoint_path(root: Path, strategy: str) -> Path:
    return root / "checkpoints" / strategy / "last.pt"


def fingerprint(params: Params, manifest: dict) -> str:
    """What a checkpoint may be resumed against: the training recipe and the exact shards."""
    train = params.train
    recipe = {
        "seed": params.seed,
        "model": [params.model.name, params.model.pretrained, params.model.freeze_backbone],
        "train": [
            train.epochs,
            train.batch_size,
            train.lr,
            train.weight_decay,
            train.label_smoothing,
            train.sync_batchnorm,
            train.shuffle_buffer,
        ],
        "shards": sorted(shard["sha256"] for shard in manifest["shards"]),
        "augment": dataclasses.asdict(train.augment),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer())  # a kill mid-write leaves the previous checkpoint intact


def load_checkpoint(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none. Loaded as plain tensors and
    containers (`weights_only=True`): a checkpoint file cannot run code."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != expected_fingerprint:
        raise UserError(
            f"the checkpoint {path} was made with other params or data: delete it to start over, "
            f"or restore the params it was made with, or set train.resume: false"
        )
    return state
