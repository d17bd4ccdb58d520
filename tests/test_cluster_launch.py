"""The cluster launch templates, rendered for 2 nodes without a cluster: `deploy/slurm/train_ddp.sbatch`
runs with stand-ins for `srun` and `scontrol` and fake SLURM variables, the PyTorchJob's container
command runs with the variables Kubeflow's operator sets, and a stand-in `python` records the train
commands they would start (everything else runs for real). Each node must train from a valid params
file that differs from params.yaml only in its own `distributed.*`, and torchrun must meet at node 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params, to_flat_dict
from pipeline.train import torchrun_command

from conftest import REPO

SBATCH = REPO / "deploy" / "slurm" / "train_ddp.sbatch"
PYTORCHJOB = REPO / "deploy" / "kubernetes" / "pytorchjob.yaml"

SRUN = """#!/bin/bash
# srun: the command once per node of the allocation, with the variables SLURM sets in each task.
while [[ "$1" == --* ]]; do shift; done
hosts=($FAKE_SLURM_HOSTS)
for i in "${!hosts[@]}"; do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NNODES=${#hosts[@]} \\
        SLURMD_NODENAME=${hosts[$i]} "$@" || exit $?
done
"""
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf '%s\\n' $FAKE_SLURM_HOSTS
"""
PYTHON = """#!/bin/bash
# python: record `-m pipeline train ...` (its arguments, params file and environment); run anything else.
if [ "$1 $2 $3" = "-m pipeline train" ]; then
    record=$(mktemp "$RECORD_DIR/train.XXXXXX")
    printf '%s\\n' "$@" > "$record.args"
    cp "${@: -1}" "$record.yaml"
    env > "$record.env"
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def cluster_env(tmp_path) -> dict[str, str]:
    stubs, records = tmp_path / "bin", tmp_path / "records"
    stubs.mkdir()
    records.mkdir()
    for name, script in (("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON)):
        (stubs / name).write_text(script)
        (stubs / name).chmod(0o755)
    return {
        **os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
        "REAL_PYTHON": sys.executable, "RECORD_DIR": str(records), "TMPDIR": str(tmp_path),
    }  # fmt: skip


def recorded_trainings(env: dict[str, str]) -> list[dict]:
    """What each node would have run, in node-rank order."""
    records = []
    for args in sorted(Path(env["RECORD_DIR"]).glob("train.*.args")):
        stem = str(args.with_suffix(""))  # train.XXXXXX
        environment = dict(
            line.split("=", 1) for line in Path(stem + ".env").read_text().splitlines() if "=" in line
        )
        records.append(
            {"args": args.read_text().splitlines(), "params": load_params(stem + ".yaml"), "env": environment}
        )
    return sorted(records, key=lambda r: r["params"].distributed.node_rank)


def check_two_nodes(trainings: list[dict], endpoint: str) -> None:
    shipped = {
        k: v
        for k, v in to_flat_dict(load_params(REPO / "params.yaml")).items()
        if not k.startswith("distributed.")
    }
    assert len(trainings) == 2
    host, port = endpoint.rsplit(":", 1)
    for rank, training in enumerate(trainings):
        assert training["args"][:5] == ["-m", "pipeline", "train", "ddp", "--params"]
        params = training["params"]
        assert (
            params.distributed.nnodes,
            params.distributed.node_rank,
            params.distributed.rdzv_endpoint,
        ) == (2, rank, endpoint)
        assert {k: v for k, v in to_flat_dict(params).items() if not k.startswith("distributed.")} == shipped
        command = torchrun_command(params, Path(training["args"][5]), REPO)
        expected = {
            "--nnodes=2",
            f"--node-rank={rank}",
            f"--master-addr={host}",
            f"--master-port={port}",
            f"--nproc-per-node={params.gpus}",
        }
        assert expected <= set(command) and "--standalone" not in command


def test_the_sbatch_script_starts_one_training_per_node_meeting_at_node_0(cluster_env):
    env = {
        **cluster_env,
        "FAKE_SLURM_HOSTS": "gpu-07 gpu-12",
        "SLURM_JOB_NODELIST": "gpu-[07,12]",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
    }
    result = subprocess.run(
        ["bash", str(SBATCH)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trainings = recorded_trainings(env)
    check_two_nodes(trainings, "gpu-07:29500")
    assert [Path(t["args"][5]).name for t in trainings] == [
        "asl-params-4242-node0.yaml",
        "asl-params-4242-node1.yaml",
    ]
    header = [line.split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--ntasks-per-node=1" in header, "one `train ddp` per node: torchrun starts the per-GPU processes"


def test_the_pytorchjob_runs_the_same_training_on_master_and_workers(cluster_env):
    job = yaml.safe_load(PYTORCHJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (
        set(replicas) == {"Master", "Worker"}
        and replicas["Master"]["replicas"] == 1
        and replicas["Worker"]["replicas"] >= 1
    )
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    [container] = replicas["Master"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch" and container["command"] == ["bash", "-c"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    mounted = {m["name"] for m in container["volumeMounts"]}
    assert mounted <= {v["name"] for v in replicas["Master"]["template"]["spec"]["volumes"]}

    for rank in (0, 1):  # the operator's variables in the Master's pod, then in the Worker's
        pod = {
            **cluster_env,
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "MASTER_ADDR": "asl-ddp-master-0",
            "MASTER_PORT": "23456",
        }
        result = subprocess.run(
            ["bash", "-c", container["args"][0]],
            cwd=REPO,
            env=pod,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    trainings = recorded_trainings(cluster_env)
    check_two_nodes(trainings, "asl-ddp-master-0:23456")
    assert not any({"RANK", "WORLD_SIZE"} & set(t["env"]) for t in trainings), (
        "torchrun sets RANK and WORLD_SIZE itself"
    )
