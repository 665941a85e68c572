"""A node lost under a running training run, on a `ray.cluster_utils.Cluster` of logical-GPU nodes.

Run as its own process (`python -m tests.ray.node_loss`) because it starts its own cluster; prints one
JSON line. The engine actor asks for a GPU, so it is placed on one of two one-GPU worker nodes; that node
is removed while a forward_backward runs; Ray reschedules the placement group and the actor on the other
node; the server rebuilds the run there from its snapshot and journal. The run is then compared with an
uninterrupted one on the surviving node.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def main() -> None:
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    import ray
    from fastapi.testclient import TestClient
    from ray.cluster_utils import Cluster

    from tests.ray.cluster import tiny_placement
    from tests.ray.test_ray_recovery import BIG, _steps
    from tests.control.test_lifecycle import Run
    from tinkerd.backends.ray_engine import RaySampler, RayTrainer, start_or_attach
    from tinkerd.server.app import create_app
    from tinkerd.control.plane import ServerConfig

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 128 * 1024 * 1024})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=128 * 1024 * 1024) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    handle = start_or_attach(tiny_placement("tiny", num_gpus=1))
    trainer = RayTrainer([handle])
    first = ray.get(handle.describe.remote())
    doomed = next(node for node in nodes if node.node_id == first["node_id"])

    def remove_node() -> None:
        time.sleep(0.3)
        cluster.remove_node(doomed, allow_graceful=False)

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(ServerConfig(data_dir=Path(tmp), long_poll_seconds=5, restore_point_every_steps=2), trainer,
                         RaySampler(trainer))
        with TestClient(app) as client:
            run = Run(client, seed=4)
            interrupted = _steps(run, lambda: threading.Thread(target=remove_node).start())
            after = ray.get(handle.describe.remote())
            reference = _steps(Run(client, seed=4))
            rebuilds = app.state.tinkerd.runs.rebuilds
    print(json.dumps({
        "node_before": first["node_id"], "node_after": after["node_id"], "gpu_ids_after": after.get("gpu_ids"),
        "rebuilds": list(rebuilds.values()), "losses_equal": interrupted["losses"] == reference["losses"],
        "samples_equal": interrupted["samples"] == reference["samples"],
        "logprobs_equal": bool(np.array_equal(interrupted["logprobs"], reference["logprobs"])),
        "big_batch_datums": len(BIG["forward_backward_input"]["data"]),
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
