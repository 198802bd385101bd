"""Fixtures shared by the test modules that run real Ray Tune experiments."""

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for one test module; its address, for subprocesses that join it."""
    import ray

    # address="local": a Ray of its own, never one that happens to run on this machine (ray.init()
    # without an address joins a cluster started by ray start or another process, and then refuses num_cpus).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
