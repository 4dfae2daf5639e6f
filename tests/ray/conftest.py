"""One small multi-node Ray cluster (Ray's own ``ray.cluster_utils.Cluster``: a head and three
raylets, each a Ray node with its own node id and one CPU) and one pdserve ``RayCluster`` on
it, shared by every test in tests/ray (starting Ray costs seconds on a small machine).

Every worker reserves one CPU, so each lands on a node of its own: prefill and decode always
run on different Ray nodes. The head has no CPUs (it runs only Ray's control plane) and is
never killed; the spare node takes restarted and added workers.
"""
import pytest

ray = pytest.importorskip("ray", reason="the Ray launcher tests need Ray: pip install 'pdserve[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from router.ray_launcher import RayCluster, RayOptions  # noqa: E402
from tests.tiny_models import make_tiny_checkpoint  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 100 * 1024 * 1024}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", num_kv_heads=2,
                                vocab_size=258, with_tokenizer=True, seed=3)


@pytest.fixture(scope="session")
def ray_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 100 * 1024 * 1024, "include_dashboard": False,
        # A killed node is declared dead after about 3 s instead of Ray's default 30 s or so.
        "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                           "health_check_failure_threshold": 3}})
    for _ in range(3):
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def pd_cluster(ray_nodes, tiny_model):
    options = RayOptions(address=ray_nodes.address, cpus_per_rank=1, drain_timeout_s=60)
    # With one worker per role, requests wait for a killed one's restart (seconds on a busy machine).
    router_options = {"heartbeat_timeout_s": 3.0, "unavailable_timeout_s": 150.0}
    with RayCluster(str(tiny_model), num_prefill=1, num_decode=1, num_kv_blocks=256, ray=options,
                    router_options=router_options, startup_timeout_s=180) as cluster:
        yield cluster
