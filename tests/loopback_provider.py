"""Ray's single-machine node provider for autoscaler tests, with its nodes on the tests' loopback address.

Ray's ``FakeMultiNodeProvider`` starts each node it "launches" as local raylet processes (the
autoscaler on this machine really scales). It gives them the machine's outward address; the tests
keep every Ray endpoint on loopback, so here each node gets ``servers.NODE_IP``. The autoscaler
imports this module by name (``provider.module`` in the cluster config): ``tests`` is on the
head's PYTHONPATH.
"""

import ray._private.services as services
import ray.util
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

NODE_IP = "127.0.0.2"  # servers.NODE_IP, not imported: this runs inside Ray's autoscaler


class LoopbackNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # The parent, and the node it starts, ask Ray for this machine's address (by both names).
        saved = services.get_node_ip_address, ray.util.get_node_ip_address
        services.get_node_ip_address = ray.util.get_node_ip_address = lambda address=None: NODE_IP
        try:
            return super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        finally:
            services.get_node_ip_address, ray.util.get_node_ip_address = saved
