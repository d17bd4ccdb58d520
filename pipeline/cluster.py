r"""A node's own params file for a multi-node `ddp` training that a cluster launches (SLURM, Kubernetes).

    python -m pipeline node-params --nnodes 2 --node-rank 1 --rdzv-endpoint node-a:29500 \
        --out /tmp/params.node1.yaml
    python -m pipeline train ddp --params /tmp/params.node1.yaml

The train command reads only a params file, but the nodes of one job differ in
`distributed.node_rank`, and the rendezvous endpoint is known only once the scheduler has picked the
nodes. This writes params.yaml with the three `distributed.*` keys filled in from the job, validated
like params.yaml itself. `deploy/slurm/train_ddp.sbatch` and `deploy/kubernetes/pytorchjob.yaml`
call it on every node.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.config import load_params, params_from_dict, to_yaml_dict


def write_node_params(params_file: Path, nnodes: int, node_rank: int, rdzv_endpoint: str, out: Path) -> Path:
    """Copy `params_file` to `out` with this node's `distributed.*`; a bad value is a ConfigError."""
    values = to_yaml_dict(load_params(params_file))
    values["distributed"].update(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    node = params_from_dict(values)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.{os.getpid()}")
    temporary.write_text(yaml.safe_dump(to_yaml_dict(node), sort_keys=False))
    temporary.replace(out)
    return out
