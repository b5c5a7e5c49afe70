"""Test configuration.

Kernel tests run the Triton kernels in the Triton interpreter on machines without a GPU. The interpreter is
chosen by ``TRITON_INTERPRET=1``, which must be in the environment before triton is first imported, so it is
set here (conftest is imported before any test module). Set ``GTPT_NO_INTERPRET=1`` to opt out.
"""
import os

import torch

if not torch.cuda.is_available() and os.environ.get("GTPT_NO_INTERPRET", "0") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: that holds folder names too
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of CPU-heavy tests: the 2-core CI machine runs other processes beside
    the tests, and OpenMP threads spinning against each other make eager ops ~10x slower. Results do not
    depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def find_coco_tiny():
    """The shared 4-image COCO set (``shared/data/coco_tiny``; used in place, never copied): ``$GTPT_COCO_TINY``,
    else ``../shared/data/coco_tiny`` beside the checkout, else ``/work/shared/data/coco_tiny``; None if absent."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ.get("GTPT_COCO_TINY", ""),
                  os.path.join(here, "..", "..", "shared", "data", "coco_tiny"),
                  "/work/shared/data/coco_tiny"]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "annotations", "person_keypoints_tiny.json")):
            return os.path.abspath(c)
    return None


@pytest.fixture(scope="session")
def coco_tiny():
    """Path of the coco_tiny folder (annotations/, images/, person_detection_results/, results/)."""
    path = find_coco_tiny()
    if path is None:
        pytest.skip("coco_tiny data not found (set GTPT_COCO_TINY to shared/data/coco_tiny)")
    return path
