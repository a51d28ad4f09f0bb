"""One local Ray for the in-process scenarios of a module; the daemons built on it do not own it."""


import pytest
import ray

from everlearn import failpoints


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_failpoints(monkeypatch):
    """Every scenario starts and ends with no failpoint armed, in this process and for its actors."""
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.reload("")
    yield
    failpoints.reload("")
