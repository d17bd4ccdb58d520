"""DDP on CPU with gloo, started by the real torchrun: correctness of the strategy and the loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "ddp_probe.py"

pytestmark = pytest.mark.slow


def _run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _torchrun(processes: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        *args,
    ]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def probe_results(tmp_path_factory):
    """Two ddp ranks on gloo, and one process with the same global batch."""
    ddp_dir = tmp_path_factory.mktemp("ddp")
    single_dir = tmp_path_factory.mktemp("single")
    _run(_torchrun(2, str(PROBE), str(ddp_dir)))
    _run([sys.executable, str(PROBE), str(single_dir)])
    return _load(ddp_dir / "rank0.pt"), _load(ddp_dir / "rank1.pt"), _load(single_dir / "rank0.pt")


def test_ranks_end_with_identical_weights(probe_results):
    rank0, rank1, _ = probe_results
    assert rank0["world_size"] == rank1["world_size"] == 2
    for name, tensor in rank0["state"].items():
        assert torch.equal(tensor, rank1["state"][name]), name


def test_ddp_matches_one_process_on_the_same_global_batch(probe_results):
    rank0, _, single = probe_results
    for name, tensor in single["state"].items():
        torch.testing.assert_close(rank0["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    moved = [
        name for name, tensor in single["state"].items() if not torch.equal(tensor, single["initial"][name])
    ]
    assert moved == list(single["state"]), (
        "training must have changed every weight, or agreement proves nothing"
    )


def test_ranks_see_disjoint_halves_of_each_epoch(probe_results):
    rank0, rank1, single = probe_results
    for epoch, (mine, theirs, whole) in enumerate(
        zip(rank0["seen"], rank1["seen"], single["seen"], strict=True)
    ):
        assert not set(mine) & set(theirs), f"epoch {epoch}: ranks overlap"
        assert len(mine) == len(theirs) == len(whole) // 2
        assert sorted(mine + theirs) == sorted(whole) == list(range(len(whole)))
    assert rank0["seen"][0] != rank0["seen"][1], "set_epoch must reshuffle every epoch"
