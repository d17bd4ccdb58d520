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


def _run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _torchrun(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def probe_results(tmp_path_factory):
    """Two ddp ranks averaging gradients through shared memory (the CPU default), and one process."""
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
    moved = [name for name, tensor in single["state"].items() if not torch.equal(tensor, single["initial"][name])]
    assert moved == list(single["state"]), "training must have changed every weight, or agreement proves nothing"


def test_ranks_see_disjoint_halves_of_each_epoch(probe_results):
    rank0, rank1, single = probe_results
    for epoch, (mine, theirs, whole) in enumerate(zip(rank0["seen"], rank1["seen"], single["seen"])):
        assert not set(mine) & set(theirs), f"epoch {epoch}: ranks overlap"
        assert len(mine) == len(theirs) == len(whole) // 2
        assert sorted(mine + theirs) == sorted(whole) == list(range(len(whole)))
    assert rank0["seen"][0] != rank0["seen"][1], "set_epoch must reshuffle every epoch"


def test_shared_memory_and_gloo_transports_train_the_same_weights(probe_results, tmp_path):
    rank0, _, _ = probe_results
    _run(_torchrun(2, str(PROBE), str(tmp_path), "gloo"))
    over_gloo = _load(tmp_path / "rank0.pt")
    assert (rank0["allreduce"], over_gloo["allreduce"]) == ("shared_memory", "gloo")
    for name, tensor in rank0["state"].items():
        assert torch.equal(tensor, over_gloo["state"][name]), name


def test_shared_memory_average_over_three_ranks_and_many_buckets(tmp_path):
    """Uneven and empty slices, a three-way sum, a bucket per parameter, DDP's bucket rebuild after
    the first step, a bucket layout that changes with no synchronization in between, and a rank
    that is slow to read the sums while the others run ahead."""
    _run(_torchrun(3, str(REPO / "tests" / "allreduce_probe.py"), str(tmp_path)))
    ranks = [_load(tmp_path / f"rank{rank}.pt") for rank in range(3)]
    sizes = ranks[0]["bucket_sizes"]
    assert len(sizes) == 3 and len(sizes[-1]) >= 3 and min(sizes[-1]) < 3, sizes
    for produced, reference in (("shared_memory", "gloo"), ("direct_shared_memory", "direct_gloo")):
        for name, expected in ranks[0][reference].items():
            for rank in range(3):
                assert torch.equal(ranks[rank][produced][name], ranks[0][produced][name]), (produced, rank, name)
            torch.testing.assert_close(ranks[0][produced][name], expected, rtol=1e-6, atol=1e-6, msg=f"{produced} {name}")
    for rank in ranks:  # rank 0 could not reserve memory: every rank falls back, with rank 0's reason
        assert rank["fallback"] is None and rank["no_memory_reason"].startswith("no memory for"), rank["no_memory_reason"]


def test_no_memory_for_the_gradients_names_the_cause_and_the_fix():
    """The buffer's pages are reserved up front, so a shortage is a clear answer at start, not a
    SIGBUS in the middle of a backward pass. A file-size limit stands in for a full memory."""
    script = (
        "import resource, signal\n"
        "from pipeline.shared_memory_allreduce import reserve_shared_memory\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "print(reserve_shared_memory(8 << 20))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("(None, 'cannot reserve 8 MiB") and "distributed.cpu_allreduce: gloo" in result.stdout, result.stdout


def test_the_shared_buffer_is_reserved_whole():
    from pipeline.shared_memory_allreduce import reserve_shared_memory

    fd, why = reserve_shared_memory(3 << 20)
    try:
        assert why == "" and os.fstat(fd).st_size == 3 << 20
        assert os.fstat(fd).st_blocks * 512 >= 3 << 20, "pages reserved, not a sparse file"
    finally:
        os.close(fd)
