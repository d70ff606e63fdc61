"""Suite-wide: in-process model work runs on one CPU thread.

The machine is shared (2 cores), and several tests start subprocesses or parallel cells beside
the test process; one thread each keeps them from oversubscribing the cores. ``EVOLQ_TEST_THREADS=2``
runs the in-process work on two threads instead, as a CI machine given two threads may: the
suite's numbers must hold either way.
"""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("EVOLQ_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for the tests of one module (skipped without Ray)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
